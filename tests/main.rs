//! Integration tests of Cloud48: one test binary, one module per area.

mod common;

mod agent;
mod api;
mod audit;
mod auth;
mod chaos;
mod cli;
mod cluster;
mod config;
mod console;
mod container;
mod contract;
mod convergence;
mod crash;
mod driver;
mod environment;
mod events;
mod harness;
mod health;
mod image_guests;
mod images;
mod layout;
mod linux;
mod metrics;
mod placement;
mod plugins;
mod projects;
mod queue;
mod real;
mod tour;
mod transfer;
mod upgrade;
mod vm;
mod wit;
