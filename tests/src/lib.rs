//! Helpers for droptrace's end-to-end tests.
pub mod oracledb_client;
pub mod tns_listener;
