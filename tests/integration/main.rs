//! Integration tests: each starts the real `wshost` binary on 127.0.0.1:0 with real plugins and
//! talks to it with real clients (tokio-tungstenite, raw HTTP).

mod harness;

mod authoring;
mod browser;
mod bus;
mod callbacks;
mod channels;
mod chat;
mod compression;
mod config;
mod conformance;
mod defects;
mod echo;
mod execution;
mod http2;
mod isolation;
mod kv;
mod limits;
mod loading;
mod observability;
mod parking;
mod reload;
mod routing;
mod scaffold;
mod utf8;
