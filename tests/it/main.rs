//! End-to-end tests: the real binary, real sockets, real files.

#[macro_use]
mod pg;

mod actions;
mod check;
mod connections;
mod delivery;
mod deploy;
mod disk;
mod durability;
mod e2e;
mod egress;
mod fleet;
mod fuzz;
mod inprocess;
mod log;
mod metrics;
mod reload;
mod rules;
mod secrets;
mod signing;
mod sources;
mod store;
mod support;
mod tls;
mod ui;
