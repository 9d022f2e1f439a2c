# Writ: multi-stage build, non-root runtime. The Helm chart's default image is
# `writ:<appVersion>` as built by: docker build -t writ:0.1.0 .
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY examples ./examples
RUN cargo build --release --locked --bin writ

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 writ \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin writ
COPY --from=build /src/target/release/writ /usr/local/bin/writ
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/writ"]
CMD ["serve", "--config", "/etc/writ/config/writ.toml"]
