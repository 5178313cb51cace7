//! The ingress service (issue 5). So far: webhook signature verification ([`auth`]). The HTTP
//! server, replay cache, limits and the Kafka producer come with the rest of issue 5.

pub mod auth;
