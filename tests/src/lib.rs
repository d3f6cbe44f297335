pub mod browser;
pub mod env;
pub mod fake_hypervisor;
pub mod hypervisor;
pub mod pki;
pub mod relay_server;
pub mod tls_client;
pub mod viewer;
