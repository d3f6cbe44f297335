//! Console tokens: what a token grants, how it is made, and where it is kept.

pub mod lockout;
pub mod memory;
pub mod passwords;
pub mod scheme;
pub mod seal;
pub mod sources;
pub mod store;
pub mod token;

pub use scheme::Scheme;
pub use store::{StoreError, TokenRejection, TokenStore};
pub use token::{NewToken, Secret, Target, TokenHash, TokenRecord};
