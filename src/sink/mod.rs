//! Side-effect steps: where results leave Spillway.

pub mod webhook;
