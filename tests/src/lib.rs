pub mod relay_server;
