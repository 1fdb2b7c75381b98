# The lockstep command line, for docker-compose.yml's demo instances.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY lua lua
COPY examples examples
COPY docs docs
COPY README.md README.md
COPY cli cli
COPY testkit testkit
RUN cargo build --release --locked -p lockstep-cli --bin lockstep

FROM debian:bookworm-slim
COPY --from=build /src/target/release/lockstep /usr/local/bin/lockstep
ENTRYPOINT ["lockstep"]
