# syntax=docker/dockerfile:1
# droptrace image: built by the project's own chain (`cargo xtask build --release` installs
# nightly rust-src and bpf-linker, then builds the eBPF object and the daemon), run on
# debian:bookworm-slim with just the binary. `cargo xtask image` builds it.

FROM rust:1.95-bookworm AS build
# The eBPF build calls `cargo +nightly`, and bpf-linker (built for LLVM 22) must share
# nightly's LLVM major: install the nightly the project is built with under the name
# `nightly` (rustup itself cannot alias a dated nightly).
ARG RUST_NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "$RUST_NIGHTLY" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && mv "$RUSTUP_HOME/toolchains/$RUST_NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host" \
 && rustc +nightly -vV | grep '^LLVM version: 22\.'
WORKDIR /src
COPY . .
# The target directory is a build cache, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo xtask build --release \
 && install -D -m 0755 target/release/droptrace /out/droptrace

FROM debian:bookworm-slim
# CA certificates: the default trust store of syslog+tls:// and https:// sinks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/droptrace /usr/local/bin/droptrace
LABEL org.opencontainers.image.title="droptrace" \
      org.opencontainers.image.description="eBPF packet-drop tracer for Kubernetes nodes" \
      org.opencontainers.image.source="https://github.com/droptrace/droptrace" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# Non-root by default, so a plain `docker run` holds no privileges. Tracing needs UID 0 plus
# the capabilities in deploy/capabilities.txt: the DaemonSet sets runAsUser: 0 and adds
# exactly those (no file capabilities: allowPrivilegeEscalation is false there).
USER 65532:65532
ENTRYPOINT ["droptrace"]
CMD ["run"]
