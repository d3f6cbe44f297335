pub mod relay_server;
pub mod pki;
pub mod tls_client;
