//! The ingress service (issue 5). So far: webhook signature verification ([`auth`]), the
//! replay cache of delivery ids ([`replay`]) and the per-IP and per-source rate limits
//! ([`limit`]). The HTTP server and the Kafka producer come with the rest of issue 5.

pub mod auth;
pub mod limit;
pub mod replay;
