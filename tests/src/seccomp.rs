//! Runs a child the way a container runtime's seccomp profile would: the system calls named
//! fail with `EPERM` and everything else runs. Docker's default profile (and so Kolla's
//! OpenStack containers, where nova's console proxies run) answers `io_uring_setup`,
//! `io_uring_enter` and `io_uring_register` that way, and `bpf` too without CAP_SYS_ADMIN.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Those of Docker's default profile that relay's kernel back-ends need.
pub const CONTAINER_DENIED: &[libc::c_long] =
    &[libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register, libc::SYS_bpf];

/// Makes `command`'s child deny `syscalls` with `EPERM` from its first instruction on.
pub fn deny(command: &mut Command, syscalls: &[libc::c_long]) {
    let filter = filter(syscalls);
    let run = move || {
        let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
        // SAFETY: prctl only reads `program`, which lives until the call returns; both calls
        // are plain system calls, safe between fork and exec (no allocation, no lock).
        #[allow(unsafe_code)]
        let failed = unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog) != 0
        };
        if failed { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    };
    // SAFETY: the closure makes two system calls on data built before the fork.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(run);
    }
}

/// A classic BPF program: load the system call's number; for each denied one, a match
/// jumps to the last instruction (EPERM); no match falls through to "allow".
fn filter(syscalls: &[libc::c_long]) -> Vec<libc::sock_filter> {
    let statement = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    // `nr` is the first field of `struct seccomp_data`.
    let mut program = vec![statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0)];
    for (i, &nr) in syscalls.iter().enumerate() {
        let to_deny = (syscalls.len() - i) as u8;
        program.push(libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt: to_deny, jf: 0, k: nr as u32 });
    }
    program.push(statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    program.push(statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    program
}
