//! veer: a transparent L4 sidecar proxy that speaks Istio's TCP routing API.
//!
//! A connection's trip reads straight down the modules:
//! [`proxy::listen`] accept → [`proxy::orig_dst`] original destination → [`routing`] lookup in
//! the current snapshot → endpoint pick → [`proxy::connect`] → [`proxy::relay`] →
//! [`proxy::record`]. Config flows the other way, once: [`config`] files → parse →
//! [`routing::compile()`] → swap.
// `unsafe` only in `sys::epolls_created_by` (allowed there, with SAFETY notes); denied elsewhere.
#![deny(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod client;
pub mod config;
pub mod echo;
pub mod gateway_service;
pub mod inject;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod sys;
