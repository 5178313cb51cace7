//! Side-effect steps: where results leave Spillway.

pub mod slack;
pub mod webhook;
