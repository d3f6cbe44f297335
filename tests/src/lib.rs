pub mod relay_server;
pub mod pki;
pub mod tls_client;
pub mod env;
pub mod browser;
pub mod hypervisor;
pub mod viewer;
pub mod fake_hypervisor;
