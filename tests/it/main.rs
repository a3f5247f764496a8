//! End-to-end tests: the real binary, real sockets, real files.

mod check;
mod durability;
mod e2e;
mod support;
