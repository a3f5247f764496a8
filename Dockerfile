# postbackd's container image. Build and run where Docker (or Podman) exists:
#   docker build -t postbackd .
#   docker run --rm -p 8080:8080 -v "$PWD/config:/etc/postbackd:ro" \
#     -v postbackd-data:/var/lib/postbackd -e POSTBACKD_ADMIN_TOKEN postbackd
# The rules are read from /etc/postbackd (mount them read-only, or a git-sync volume), the
# store lives in the /var/lib/postbackd volume, the listener is on 0.0.0.0:8080.

ARG RUST_IMAGE=docker.io/library/rust:1-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

# ---- build: the release binary -------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the code does not
# rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs && echo 'fn main() {}' > bench/bench.rs \
 && cargo build --release --locked --bin postbackd \
 && rm -rf src bench
COPY src src
COPY bench bench
# Newer than the placeholders, so Cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin postbackd \
 && mkdir -p /out/data \
 && cp target/release/postbackd /out/postbackd

# ---- runtime: the binary, CA certificates, git (for the commit and author the log shows
# of each rule), a user of its own, and nothing else ------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# git refuses a checkout another user owns (a mounted or git-synced volume): trust them all.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* \
 && groupadd --system --gid 10001 postbackd \
 && useradd --system --uid 10001 --gid postbackd --home-dir /var/lib/postbackd --no-create-home --shell /usr/sbin/nologin postbackd \
 && mkdir -p /etc/postbackd \
 && git config --system --add safe.directory '*'
COPY --from=build /out/postbackd /usr/local/bin/postbackd
COPY --from=build --chown=10001:10001 /out/data /var/lib/postbackd
ENV POSTBACKD_CONFIG=/etc/postbackd \
    POSTBACKD_DATA_DIR=/var/lib/postbackd \
    POSTBACKD_LISTEN=0.0.0.0:8080 \
    POSTBACKD_LOG_FORMAT=json
USER 10001:10001
VOLUME ["/var/lib/postbackd"]
EXPOSE 8080
# A slim image has no curl: the binary asks its own /-/ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 CMD ["postbackd", "healthcheck"]
# postbackd handles SIGTERM itself (it finishes in-flight deliveries), so it can be PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["postbackd"]
CMD ["run"]
