//! Console passwords, per instance. The clear password is kept because VNC
//! authentication needs it to compute the DES check; it lives only here, never in logs,
//! listings or replies.

use super::store::StoreFuture;
use super::token::Secret;
use std::collections::HashMap;
use std::sync::Mutex;

/// VNC authentication's DES key holds this many bytes of password; RFB carries no more.
pub const MAX_PASSWORD_LEN: usize = 8;

/// Why a password cannot be used with VNC authentication (a console password, or a
/// hypervisor's).
pub fn check_password(password: &str) -> Result<(), String> {
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(format!("the password is {} bytes; VNC authentication carries at most {MAX_PASSWORD_LEN}", password.len()));
    }
    if !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("the password must be printable ASCII (VNC viewers cannot send other characters reliably)".into());
    }
    Ok(())
}

pub trait PasswordStore: Send + Sync + 'static {
    fn set(&self, instance: &str, password: Secret) -> StoreFuture<'_, ()>;
    /// False when the instance had no password.
    fn clear(&self, instance: &str) -> StoreFuture<'_, bool>;
    fn get(&self, instance: &str) -> StoreFuture<'_, Option<Secret>>;
}

/// The embedded password store.
pub struct MemoryPasswords {
    map: Mutex<HashMap<String, Secret>>,
    max: usize,
}

impl MemoryPasswords {
    pub fn new(max: usize) -> Self {
        MemoryPasswords { map: Mutex::new(HashMap::new()), max }
    }
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Secret>> {
        // Single inserts and removes only: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The answers of [`PasswordStore`], at once (see [`super::memory::MemoryStore`]'s).
impl MemoryPasswords {
    pub fn set_now(&self, instance: &str, password: Secret) -> Result<(), super::StoreError> {
        let mut map = self.map();
        if map.len() >= self.max && !map.contains_key(instance) {
            return Err(super::StoreError::Full(self.max));
        }
        map.insert(instance.to_string(), password);
        Ok(())
    }
    pub fn clear_now(&self, instance: &str) -> Result<bool, super::StoreError> {
        Ok(self.map().remove(instance).is_some())
    }
    pub fn get_now(&self, instance: &str) -> Result<Option<Secret>, super::StoreError> {
        Ok(self.map().get(instance).cloned())
    }
}

impl PasswordStore for MemoryPasswords {
    fn set(&self, instance: &str, password: Secret) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(self.set_now(instance, password)))
    }
    fn clear(&self, instance: &str) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(self.clear_now(instance)))
    }
    fn get(&self, instance: &str) -> StoreFuture<'_, Option<Secret>> {
        Box::pin(std::future::ready(self.get_now(instance)))
    }
}

#[cfg(test)]
mod tests {
    use super::check_password;

    #[test]
    fn passwords_rfb_cannot_carry_are_refused() {
        assert!(check_password("123456789").is_err());
        assert!(check_password("").is_err());
        assert!(check_password("pässwd").is_err());
        assert!(check_password("s3cret!").is_ok());
    }
}
