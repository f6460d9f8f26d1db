//! Integration tests of Cloud48: one test binary, one module per area.

mod common;

mod api;
mod cli;
mod container;
mod crash;
mod driver;
mod environment;
mod queue;
