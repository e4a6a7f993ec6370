# syntax=docker/dockerfile:1.7
#
# One image for every wsgate subcommand (gateway, controller, publish, demo):
#
#   docker build -t wsgate:0.1.0 .
#   docker run --rm -p 8080:8080 wsgate:0.1.0 gateway --backend http://host.docker.internal:3000
#
# Needs BuildKit (the default builder of current Docker; `DOCKER_BUILDKIT=1` on older ones) for
# the cache mounts, which keep the cargo registry and target directory between builds.
# For reproducible production builds, pin the two base images by digest as well as by tag.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Only what the binary is built from (see .dockerignore).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wsgate \
    && install -D -m 0755 target/release/wsgate /out/wsgate

# glibc and libgcc from Debian 12, the same Debian as the builder; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG RUST_VERSION
LABEL org.opencontainers.image.title="wsgate" \
      org.opencontainers.image.description="WebSocket-over-HTTP gateway, controller and sidecar injector" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.wsgate.rust-version="${RUST_VERSION}"
COPY --from=build /out/wsgate /usr/local/bin/wsgate
# distroless's nonroot user, numerically, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# gateway clients, gateway admin, controller control API, injection webhook
EXPOSE 8080 9090 8081 9443
ENTRYPOINT ["/usr/local/bin/wsgate"]
CMD ["--help"]
