//! Side-effect steps: where results leave Spillway.

pub mod kafka;
pub mod slack;
pub mod webhook;
