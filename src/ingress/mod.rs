//! The ingress service (issue 5). So far: webhook signature verification ([`auth`]) and the
//! replay cache of delivery ids ([`replay`]). The HTTP server, limits and the Kafka producer
//! come with the rest of issue 5.

pub mod auth;
pub mod replay;
