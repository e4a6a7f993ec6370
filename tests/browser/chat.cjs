// Drives headless Chromium through the demo page: two tabs join the chat, a message typed in
// one appears in the other. Usage: NODE_PATH=node_modules node chat.cjs URL CHROMIUM_PATH
const { chromium } = require('playwright-core');

(async () => {
const [url, executablePath] = process.argv.slice(2);
const deadline = 15000;

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const context = await browser.newContext();
  const alice = await context.newPage();
  const bob = await context.newPage();
  for (const [page, name] of [[alice, 'alice'], [bob, 'bob']]) {
    await page.goto(url, { timeout: deadline });
    await page.fill('#name', name);
    await page.click('#join-btn');
    await page.waitForSelector('body[data-connected="true"]', { timeout: deadline });
  }
  // Both are in the room: alice sees bob join.
  await alice.waitForFunction(() => document.getElementById('log').textContent.includes('bob joined'), null, { timeout: deadline });
  await alice.fill('#msg', 'hello from alice');
  await alice.click('#send-btn');
  await bob.waitForFunction(() => document.getElementById('log').textContent.includes('alice: hello from alice'), null, { timeout: deadline });
  const text = await bob.textContent('#log');
  console.log('OK ' + JSON.stringify(text));
} finally {
  await browser.close();
}
})().catch((e) => { console.error(e); process.exit(1); });
