# syntax=docker/dockerfile:1
#
# Container image of the splitee cloud worker (docs/deployment.md). Multi-stage: the first
# stage compiles `cloud-worker` with the Rust toolchain and a C compiler (tokenizers builds
# Oniguruma from C); the second holds only the binary, the embedded default model and the
# configuration, on Debian 12 slim (glibc 2.36, above the binary's glibc floor).
#
#   docker build -t splitee-cloud-worker .
#   docker build -t splitee-cloud-worker:gpu --build-arg FEATURES=cloud-worker/wgpu .   # GPU worker
#   cloud-worker gen-certs --out-dir certs   # or your own server.pem, server.key.pem, client-ca.pem
#   docker run --rm -p 4433:4433/udp -p 9433:9433 -v "$PWD/certs/worker:/etc/splitee/certs:ro" \
#       splitee-cloud-worker
#
# Not built in this project's CI (no Docker engine there); kept deliberately plain.

ARG RUST_VERSION=1.95
# Cargo features of the build: empty for the CPU worker, `cloud-worker/wgpu` for the GPU one.
ARG FEATURES=""

FROM rust:${RUST_VERSION}-bookworm AS build
ARG FEATURES
WORKDIR /src
COPY . .
# `--locked`: exactly the dependency versions of Cargo.lock. The cache mounts keep the crate
# downloads and the (long: burn) compilation between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p cloud-worker ${FEATURES:+--features "$FEATURES"} \
    && install -m 0755 target/release/cloud-worker /usr/local/bin/cloud-worker

FROM debian:bookworm-slim
ARG FEATURES
# The GPU worker loads the Vulkan loader at run time (the driver itself comes from the node:
# the NVIDIA container toolkit mounts its Vulkan ICD when the `graphics` capability is asked
# for, below).
RUN if [ -n "$FEATURES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends libvulkan1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics
# The worker reads its model and configuration from here; certificates are mounted at run
# time (never baked into the image).
COPY --from=build /usr/local/bin/cloud-worker /usr/local/bin/cloud-worker
COPY models/default /usr/local/share/splitee/models/default
COPY configs/cloud-worker.toml /etc/splitee/cloud-worker.toml
# An unprivileged user (the port is above 1024, no capability needed).
USER 10001:10001
WORKDIR /usr/local/share/splitee
# QUIC (UDP) and the HTTP endpoint: /metrics, /healthz (liveness), /readyz (readiness: 503
# while the model loads, while draining and while the queue is over its bound).
EXPOSE 4433/udp 9433/tcp
ENV RUST_LOG=info
# SIGTERM (docker stop) finishes the in-flight requests; give it more than the 30 s drain
# (`docker stop -t 45`, or terminationGracePeriodSeconds on Kubernetes).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cloud-worker", "serve", \
    "--config", "/etc/splitee/cloud-worker.toml", \
    "--model", "/usr/local/share/splitee/models/default", \
    "--cert", "/etc/splitee/certs/server.pem", \
    "--key", "/etc/splitee/certs/server.key.pem", \
    "--client-ca", "/etc/splitee/certs/client-ca.pem"]
# Inside a container the metrics endpoint must listen beyond loopback to be reachable.
CMD ["--metrics-listen", "0.0.0.0:9433"]
