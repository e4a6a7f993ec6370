//! Micro-benchmarks of the pure codecs: `application/websocket-events` encode/decode and the
//! RFC 6455 frame codec, for a small (64-byte) and a large (16 KiB) message.
//!
//! Run with `cargo bench --bench codec`; results are in `target/criterion/`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::protocol::events::{self, Decoder, Event};
use wsgate::protocol::frame::{self, FrameDecoder, Message};

const SIZES: [(&str, usize); 2] = [("64B", 64), ("16KiB", 16 * 1024)];
const LIMIT: usize = 1 << 20;

fn payload(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

fn events_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    for (name, len) in SIZES {
        let event = Event::Text(payload(len));
        let body = events::encode(std::slice::from_ref(&event));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &event, |b, e| {
            b.iter(|| events::encode(std::slice::from_ref(black_box(e))))
        });
        g.bench_with_input(BenchmarkId::new("decode_body", name), &body, |b, body| {
            b.iter(|| events::decode_body(black_box(body.clone()), LIMIT))
        });
        g.bench_with_input(BenchmarkId::new("decode_incremental", name), &body, |b, body| {
            b.iter(|| {
                let mut buf = BytesMut::from(&body[..]);
                let mut d = Decoder::new(LIMIT);
                let e = d.decode(&mut buf);
                black_box(e)
            })
        });
    }
    // A batch as the session sends it when 16 messages queued during one request.
    let batch: Vec<Event> = (0..16).map(|_| Event::Text(payload(64))).collect();
    let body = events::encode(&batch);
    g.throughput(Throughput::Elements(16));
    g.bench_function("encode/16x64B", |b| b.iter(|| events::encode(black_box(&batch))));
    g.bench_function("decode_body/16x64B", |b| {
        b.iter(|| events::decode_body(black_box(body.clone()), LIMIT))
    });
    g.finish();
}

fn frame_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, len) in SIZES {
        let msg = Message::Text(payload(len));
        let mut masked = BytesMut::new();
        frame::encode_masked(&msg, [0x11, 0x22, 0x33, 0x44], &mut masked);
        let masked = masked.freeze();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("decode_masked", name), &masked, |b, wire| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                let mut d = FrameDecoder::new(LIMIT);
                black_box(d.decode(&mut buf))
            })
        });
        g.bench_with_input(BenchmarkId::new("encode", name), &msg, |b, m| {
            let mut out = BytesMut::with_capacity(len + 16);
            b.iter(|| {
                out.clear();
                frame::encode_message(black_box(m), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, events_codec, frame_codec);
criterion_main!(benches);
