//! The Markdown report: machine facts, the results tables, how they were measured.

use crate::Run;
use crate::measure::{PING_BYTES, Rate};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text)
}

fn line_with(program: &str, args: &[&str], needle: &str) -> Option<String> {
    output(program, args)?.lines().find(|l| l.contains(needle)).map(|l| l.trim().to_string())
}

fn machine(run: &Run, relay_bin: &Path) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()));
    let nproc = crate::procs::first_line("nproc", &[]).unwrap_or_else(|| "?".into());
    let kernel = crate::procs::first_line("uname", &["-r"]).unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "?".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let rev = crate::procs::first_line("git", &["-C", &root.to_string_lossy(), "rev-parse", "--short", "HEAD"]);
    let dirty =
        output("git", &["-C", &root.to_string_lossy(), "status", "--porcelain", "--", "relay"]).is_some_and(|s| !s.trim().is_empty());
    let relay_version = crate::procs::first_line(&relay_bin.to_string_lossy(), &["--version"]).unwrap_or_else(|| "?".into());
    let relay = match rev {
        // Another build (`--relay`): this checkout's commit says nothing of it.
        _ if run.args.relay.is_some() => format!("{relay_version}, the binary at {}", relay_bin.display()),
        Some(rev) => format!("{relay_version}, commit {rev}{}, release build", if dirty { " + uncommitted changes in relay/" } else { "" }),
        None => format!("{relay_version}, release build"),
    };
    let mut facts = vec![
        ("date".to_string(), crate::procs::first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "?".into())),
        ("CPU".into(), format!("{} (`nproc`: {nproc})", model.unwrap_or_else(|| "?".into()))),
        ("kernel (`uname -r`)".into(), kernel),
        ("memory".into(), mem),
        ("relay".into(), relay),
    ];
    let installed = |key: &str| run.paths.iter().any(|p| p.key == key && p.skipped.is_none());
    if installed("socat") {
        facts.push(("socat".into(), line_with("socat", &["-V"], "socat version").unwrap_or_else(|| "?".into())));
    }
    if installed("haproxy") {
        let v = line_with("haproxy", &["-v"], "version").unwrap_or_else(|| "?".into());
        facts.push(("HAProxy".into(), v.split(" - ").next().unwrap_or(&v).to_string()));
    }
    if installed("websockify") {
        let v = crate::procs::first_line("dpkg-query", &["-W", "-f=${Version}", "websockify"]).unwrap_or_else(|| "installed".into());
        facts.push(("websockify".into(), format!("websockify {v} (Python)")));
    }
    facts.push(("load average (1, 5, 15 min) before / after".into(), format!("{} / {}", run.load_before, run.load_after)));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let secs = run.elapsed.as_secs_f64();
    facts.push((
        "CPU used by other processes during the run".into(),
        format!("{:.0} s of {:.0} s available ({:.0}%)", run.others_cpu, secs * cores, 100.0 * run.others_cpu / (secs * cores)),
    ));
    facts.push(("bench run time".into(), format!("{secs:.0} s")));
    facts
}

fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!(" ({:.2}×)", value / b),
        _ => String::new(),
    }
}

fn rate_cell(rate: Option<Rate>, base: Option<Rate>) -> String {
    match rate {
        Some(r) => {
            format!("{:.2}{}{}", r.gb_per_sec(), if r.capped { "†" } else { "" }, ratio(r.gb_per_sec(), base.map(|b| b.gb_per_sec())))
        }
        None => "–".into(),
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

pub fn markdown(run: &Run, relay_bin: &Path) -> String {
    let a = &run.args;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `cargo xtask bench` (the `relay-bench` crate in `bench/`), which measures every path below in one \
         run on one machine, so the ratios compare like with like. Run it again to refresh this page; absolute numbers \
         belong to this machine only.\n"
    );
    let _ = writeln!(w, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine(run, relay_bin) {
        let _ = writeln!(w, "| {k} | {v} |");
    }

    let direct = run.paths.iter().find(|p| p.key == "direct");
    let base_rate = |slot: usize| direct.and_then(|d| d.rate(slot));
    let conns = a.conns;
    let _ = writeln!(w, "\n## Results\n");
    let _ = writeln!(
        w,
        "Throughput in GB/s (10⁹ bytes per second), latency in µs, each followed by its ratio to the direct connection \
         measured in the same run (for latency a ratio above 1 means slower). Proxy CPU is the proxy process's user + system \
         time per GB moved over all throughput runs; direct has no proxy. Machine CPU is every core's busy time per GB over the \
         same runs (viewers, fake hypervisor, proxy, and kernel work outside any process, such as a sockmap's kworkers \
         and softirqs); in brackets, its excess over direct: what the proxy costs the machine, kernel work included.\n"
    );
    let _ = writeln!(
        w,
        "| path | up, 1 conn | down, 1 conn | up, {conns} conns | down, {conns} conns | ping-pong p50 | ping-pong p99 | handshakes/s | proxy CPU s/GB | machine CPU s/GB (over direct) |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|");
    let machine_per_gb = |p: &crate::PathResult| {
        p.cpu
            .map(|(_, b)| b)
            .or_else(|| (p.key == "direct").then(|| total_bytes(p)))
            .filter(|&b| b > 0)
            .map(|b| p.machine_cpu / (b as f64 / 1e9))
    };
    let direct_machine = direct.and_then(machine_per_gb);
    let relay_cpu = run.paths.iter().find(|p| p.key == "connect").and_then(|p| p.cpu).map(|(c, b)| c / (b as f64 / 1e9));
    let mut notes = Vec::new();
    for p in &run.paths {
        if let Some(why) = &p.skipped {
            let _ = writeln!(w, "| {} | skipped: {why} | | | | | | | | |", p.label);
            continue;
        }
        let mut cells = vec![p.label.to_string()];
        for slot in 0..4 {
            cells.push(rate_cell(p.rate(slot), if p.key == "direct" { None } else { base_rate(slot) }));
        }
        let base_lat = direct.and_then(|d| d.latency).filter(|_| p.key != "direct");
        match &p.latency {
            Some(l) => {
                cells.push(format!("{:.1}{}", l.p50_us, ratio(l.p50_us, base_lat.map(|b| b.p50_us))));
                cells.push(format!("{:.1}{}", l.p99_us, ratio(l.p99_us, base_lat.map(|b| b.p99_us))));
            }
            None => cells.extend(["–".to_string(), "–".to_string()]),
        }
        let base_hs = direct.and_then(|d| d.handshakes.as_ref()).filter(|_| p.key != "direct").map(|h| h.per_sec());
        match &p.handshakes {
            Some(h) => {
                cells.push(format!("{:.0}{}{}", h.per_sec(), if h.capped { "†" } else { "" }, ratio(h.per_sec(), base_hs)));
                if h.failed > 0 {
                    notes.push(format!(
                        "{}: {} of {} handshakes failed; first error: {}",
                        p.label,
                        h.failed,
                        h.failed + h.ok,
                        h.first_error.as_deref().unwrap_or("?")
                    ));
                }
            }
            None => cells.push("–".into()),
        }
        cells.push(match (p.cpu, p.key) {
            (_, "direct") => "—".into(),
            (Some((cpu, bytes)), key) if bytes > 0 => {
                let per_gb = cpu / (bytes as f64 / 1e9);
                match relay_cpu {
                    Some(r) if !key.starts_with("connect") && !key.starts_with("ws") && r > 0.0 => {
                        format!("{per_gb:.2} ({:.1}× relay CONNECT)", per_gb / r)
                    }
                    _ => format!("{per_gb:.2}"),
                }
            }
            _ => "–".into(),
        });
        cells.push(match (machine_per_gb(p), direct_machine) {
            (Some(m), Some(d)) if p.key != "direct" => format!("{m:.2} (+{:.2})", m - d),
            (Some(m), _) => format!("{m:.2}"),
            _ => "–".into(),
        });
        if let Some(e) = &p.error {
            notes.push(format!("{}: failed: {e}", p.label));
        }
        let _ = writeln!(w, "| {} |", cells.join(" | "));
    }
    let any_capped = run
        .paths
        .iter()
        .any(|p| (0..4).any(|slot| p.rate(slot).is_some_and(|r| r.capped)) || p.handshakes.as_ref().is_some_and(|h| h.capped));
    if any_capped {
        let _ = writeln!(
            w,
            "\n† hit its time limit ({} s per throughput run, 10 s per handshake run): the figure is the rate over what \
             got through by then.",
            a.run_secs
        );
    }

    if !run.memory.is_empty() {
        let _ = writeln!(w, "\n### Memory per idle session\n");
        let _ = writeln!(
            w,
            "Resident memory (VmRSS) of the proxy process, before and with idle consoles open (each through ServerInit, \
             then silent). Per session = (RSS with N open − RSS before) / N; marginal = the growth from the first to the \
             last step divided by the sessions added. No ratio to direct: direct has no proxy.\n"
        );
        let steps: Vec<usize> = run
            .memory
            .iter()
            .find_map(|m| m.outcome.as_ref().ok())
            .map(|m| m.points.iter().map(|p| p.sessions).collect())
            .unwrap_or_default();
        let mut header = "| proxy | RSS before |".to_string();
        let mut rule = "|---|---|".to_string();
        for n in &steps {
            let _ = write!(header, " RSS, {n} open | per session at {n} |");
            rule.push_str("---|---|");
        }
        if steps.len() > 1 {
            let _ = write!(header, " marginal per session ({}→{}) | consoles relay counted |", steps[0], steps[steps.len() - 1]);
            rule.push_str("---|---|");
        }
        let _ = writeln!(w, "{header}\n{rule}");
        for m in &run.memory {
            match &m.outcome {
                Ok(mem) => {
                    let mut row = format!("| {} | {:.1} MiB |", m.label, mib(mem.baseline));
                    for p in &mem.points {
                        let per = (p.rss as f64 - mem.baseline as f64) / p.sessions as f64 / 1024.0;
                        let _ = write!(row, " {:.1} MiB | {per:.1} KiB |", mib(p.rss));
                    }
                    if let [first, .., last] = mem.points.as_slice() {
                        let marginal = (last.rss as f64 - first.rss as f64) / (last.sessions - first.sessions).max(1) as f64 / 1024.0;
                        let counted =
                            mem.points.iter().map(|p| p.live.map_or("–".into(), |n| n.to_string())).collect::<Vec<_>>().join(" / ");
                        let _ = write!(row, " {marginal:.1} KiB | {counted} |");
                    }
                    let _ = writeln!(w, "{row}");
                }
                Err(e) => {
                    let _ = writeln!(w, "| {} | failed |", m.label);
                    notes.push(format!("memory, {}: {e}", m.label));
                }
            }
        }
        let missing: Vec<&str> = run.paths.iter().filter(|p| matches!(p.key, "socat" | "websockify")).map(|p| p.label).collect();
        if !missing.is_empty() {
            let _ = writeln!(
                w,
                "\nNot measured for {}: they fork one process per connection, so 10,000 idle sessions would be \
                 10,000 processes.",
                missing.join(" and ")
            );
        }
    }

    if let Some(stores) = &run.stores {
        stores_section(w, stores, &mut notes);
    }
    if let Some(sources) = &run.sources {
        sources_section(w, sources);
    }
    for (shape, results) in &run.farm {
        farm_section(w, shape, results);
    }

    let bytes_multi = a.bytes_multi.unwrap_or(a.bytes);
    let _ = writeln!(w, "\n## How measured\n");
    let how = [
        "Everything runs on this machine over 127.0.0.1. `relay-bench` (tokio, one worker thread per core) is the viewers; \
         a second `relay-bench` process is the fake hypervisor (an RFB 3.8 server offering security type None, then \
         ServerInit for a 64×48 desktop, then a small command protocol: echo, send N bytes, or read N bytes and \
         acknowledge). The hypervisor is never the viewer's process, as in a deployment: in one process, a direct \
         round trip can run on one thread without a single wake-up, and direct's ping-pong then read 6 µs in one run and \
         86 µs in another (before 2026-12-05). The proxies run as child processes beside them and compete with them for \
         the same cores, as they would in a real deployment."
            .to_string(),
        "Paths: **direct**: the viewer connects to the fake hypervisor itself. **relay CONNECT door**: `CONNECT /console?token=…`, \
         then RFB; relay terminates RFB security on both sides and relays the rest, on the back-end named (`[relay] backend`: \
         copy, uring or sockmap; each kernel back-end in a relay process of its own, with `kernel_after_ms = 0` so it carries \
         a console from its first byte; **auto** is relay's default: on copy first, moved to the io_uring back-end once a console has lived \
         1 s and carried at least 1 MB/s since the last look, so a bulk run starts on copy and moves about a second in; \
         a raw console that still carries bytes, fewer, at its second real look (2 s after it opened) moves to sockmap, as the farm's \
         consoles do; idle consoles stay on copy). **relay WebSocket door**: `ws://…/?token=…` \
         with subprotocol `binary`, RFB in binary messages, on copy or uring. **socat**: `socat TCP-LISTEN:p,fork,reuseaddr TCP:hypervisor`. \
         **HAProxy**: `mode tcp`, one frontend, one backend server, defaults otherwise. **websockify**: `websockify p hypervisor`, \
         the viewer speaks WebSocket to it, and it forwards raw TCP (no RFB termination: the viewer's handshake goes end to end). \
         The viewer's RFB handshake is the same on every path. relay runs with session limits raised for the idle-session runs \
         and otherwise its default configuration (e.g. `relay_buffer_bytes` 32 KiB; its default log level, `info`, with an audit \
         event at each console's start and end, written to a file). \
         One token serves every relay console, except in the idle-session runs (below)."
            .to_string(),
        format!(
            "Throughput: {} per direction on 1 connection, then {} per direction spread over {} connections at once; every \
             write is {} (one WebSocket message on the WebSocket paths). {} rounds over all paths in turn; each figure is \
             the median round. Time runs from when all connections have finished \
             their handshakes to the last byte's arrival (up: the hypervisor's one-byte acknowledgement is back). Up = viewer → \
             hypervisor, down = hypervisor → viewer. Each run stops after {} s at most and is then rated on what arrived.",
            size(a.bytes),
            size(bytes_multi),
            a.conns,
            size(a.chunk),
            a.repeat,
            a.run_secs
        ),
        format!(
            "Ping-pong: {} round trips of an {PING_BYTES}-byte message through the echo mode on one connection (after 200 \
             unmeasured ones), one at a time, all sockets with TCP_NODELAY; p50 and p99 of the round-trip times.",
            a.pings
        ),
        format!(
            "Handshakes/s: {} console openings, {} in flight: TCP connect, the door (CONNECT request or WebSocket upgrade), \
             the RFB handshake through ServerInit, close. relay's token exists beforehand. {} rounds over all paths in turn; \
             each figure is the median round (a round with failures, if any).",
            a.handshakes, a.inflight, a.repeat
        ),
        "Proxy CPU: utime + stime from `/proc/PID/stat` of the proxy and all its descendants (live ones, plus `cutime`/`cstime` \
         of exited ones, since socat and websockify fork per connection), taken before and after each round of the four throughput runs, \
         summed over the rounds and divided by the GB those runs moved. relay's paths are measured separately; one relay \
         process serves the copy CONNECT and WebSocket paths, another each kernel back-end."
            .to_string(),
        format!(
            "Memory: run first, on proxies started fresh (relay once per path, in a process serving nothing else) \
             with one console opened and closed before the baseline reading, then opening idle consoles \
             {} at a time with a one-second settle before reading `VmRSS` from `/proc/PID/status` (user-space memory: \
             the kernel's socket buffers are not in it). Each idle relay console is of an instance of its own (a token \
             each, made before the baseline, for an instance with a UUID-shaped name), as in a region's proxy, so what relay \
             keeps per instance is in the figure. Before starting the proxies, which inherit it, the bench raises \
             RLIMIT_NOFILE as far as it may (here to {}).",
            64, run.nofile
        ),
    ];
    for h in how {
        let _ = writeln!(w, "- {h}");
    }

    let mut spread = Vec::new();
    for p in &run.paths {
        for (slot, name) in
            ["up, 1 conn", "down, 1 conn", &format!("up, {conns} conns"), &format!("down, {conns} conns")].iter().enumerate()
        {
            let rates: Vec<f64> = p.throughput[slot].iter().map(Rate::gb_per_sec).collect();
            let (Some(median), true) = (p.rate(slot), rates.len() > 1) else { continue };
            let (lo, hi) = rates.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            if (hi - lo) > 0.2 * median.gb_per_sec() {
                spread.push(format!("{} {name} ({lo:.2}–{hi:.2})", p.label));
            }
        }
    }
    if !spread.is_empty() {
        notes.push(format!(
            "Throughput rounds differed by more than 20% of the median on: {}. Single runs are short (well under a second \
             for the fast paths), so compare ratios rather than the last digit.",
            spread.join("; ")
        ));
    }
    let handshake_rounds: Vec<String> = run
        .paths
        .iter()
        .filter(|p| p.handshake_rounds.len() > 1)
        .map(|p| format!("{}: {}", p.label, p.handshake_rounds.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")))
        .collect();
    if !handshake_rounds.is_empty() {
        notes.push(format!("Handshakes/s in each round: {}.", handshake_rounds.join("; ")));
    }
    let available = run.elapsed.as_secs_f64() * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if run.others_cpu > 0.05 * available {
        notes.push(format!(
            "The machine was not quiet: other processes used {:.0}% of its CPU time during the run (1-minute load average {} \
             before, {} after), competing with the bench and the proxies for the cores, so absolute figures are noisy; \
             ratios from the same run hold up better.",
            100.0 * run.others_cpu / available,
            run.load_before.split_whitespace().next().unwrap_or("?"),
            run.load_after.split_whitespace().next().unwrap_or("?")
        ));
    }
    notes.extend(run.notes.iter().cloned());
    notes.extend(a.note.iter().cloned());
    if !notes.is_empty() {
        let _ = writeln!(w, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(w, "- {n}");
        }
    }
    s
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Bytes a path's throughput runs moved (for direct, which has no proxy CPU entry).
fn total_bytes(p: &crate::PathResult) -> u64 {
    p.throughput.iter().flatten().map(|r| r.bytes).sum()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The console farm: round trips and CPU per path, beside direct and HAProxy.
fn farm_section(w: &mut String, shape: &crate::farm::Shape, results: &[crate::farm::FarmResult]) {
    let (title, answer) = match shape.mix {
        crate::farm::Mix::Typing => ("Console farm: typing", "that the hypervisor echoes"),
        crate::farm::Mix::Screen => ("Console farm: typing plus screen", "that the hypervisor answers with a 4-64 KiB update"),
    };
    let _ = writeln!(w, "\n## {title}\n");
    let _ = writeln!(
        w,
        "{} consoles at once, each sending a {}-byte message every {} ms (random phases) {answer}. \
         A thread of the bench wakes each console at its own instant on the kernel's high-resolution timers, grouping \
         at most {} µs of instants per wake-up (tokio's own timers fire on whole milliseconds and would send every \
         millisecond's consoles at once). Each path measured for {:.0} s on a proxy started for it, after a warm-up of {} s past the first interval (relay's `auto` moves a console that keeps carrying bytes at its second real look, 2 s after it opened), in {rounds} rounds over the paths (the \
         consoles stay open until the last round trip is in: their closing is not in the window); each figure is its median over the rounds, and the last two columns list every round's p99 and machine cost. Machine CPU is \
         every core's busy time (the bench's own client and hypervisor, and kernel work outside any process, included), \
         so compare it with direct's; per 1,000 consoles, the proxy's cost over direct: over direct's in the same \
         round, the median of the rounds. Against HAProxy: each round's p99 over HAProxy's, and each round's cost \
         over direct over HAProxy's, in the same round; the medians of those ratios.\n",
        shape.consoles,
        shape.message,
        shape.interval.as_millis(),
        shape.slot.as_micros(),
        shape.window.as_secs_f64(),
        crate::farm::SETTLE.as_secs(),
        rounds = results.iter().map(|r| r.rounds.len()).max().unwrap_or(0),
    );
    let _ = writeln!(
        w,
        "| path | round trips/s (offered) | p50 | p99 | p99.9 | p99 vs direct | proxy cores | machine cores | machine over direct, per 1,000 consoles | against HAProxy: p99, machine over direct | p99 per round | machine over direct per round |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let ok = |key: &str| results.iter().find(|r| r.key == key && r.error.is_none());
    let (direct, haproxy) = (ok("direct"), ok("haproxy"));
    let us = |v: f64| if v >= 1000.0 { format!("{:.1} ms", v / 1000.0) } else { format!("{v:.0} µs") };
    let per_1000 = |cores: f64| cores * 1000.0 / shape.consoles as f64;
    for r in results {
        if let Some(e) = &r.error {
            let what = if e.starts_with("not selected") { "skipped" } else { "failed" };
            let _ = writeln!(w, "| {} | {what}: {e} | | | | | | | | | | |", r.label);
            continue;
        }
        let vs = direct.filter(|d| d.p99_us > 0.0).map_or("–".into(), |d| format!("{:.2}×", r.p99_us / d.p99_us));
        // Each round's cost over direct's in the same round, then their median: the machine's
        // load drifts between rounds more than the paths differ, so a difference of two
        // medians (taken from different rounds) mixes that drift in.
        let over_each: Vec<f64> = direct.map_or(Vec::new(), |d| r.over_direct(d).into_iter().map(|(_, over)| per_1000(over)).collect());
        let over = if over_each.is_empty() { "–".into() } else { format!("{:.2}", median(&over_each)) };
        let over_rounds =
            if over_each.is_empty() { "–".into() } else { over_each.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ") };
        let against = haproxy.map_or("–".into(), |h| against_haproxy(r, h, direct));
        let _ = writeln!(
            w,
            "| {} | {:.0} ({:.0}) | {} | {} | {} | {vs} | {:.2} | {:.2} | {over} | {against} | {} | {over_rounds} |",
            r.label,
            r.achieved,
            r.offered,
            us(r.p50_us),
            us(r.p99_us),
            us(r.p999_us),
            r.proxy_cores,
            r.machine_cores,
            r.rounds.iter().map(|f| us(f.p99_us)).collect::<Vec<_>>().join(", ")
        );
    }
}

/// The farm's targets are ratios to HAProxy: each round's p99 over HAProxy's, and its
/// machine cost over direct over HAProxy's, both in the same round, then the medians of
/// those ratios (rounds differ more than the paths do).
fn against_haproxy(r: &crate::farm::FarmResult, haproxy: &crate::farm::FarmResult, direct: Option<&crate::farm::FarmResult>) -> String {
    let cost = direct.filter(|d| d.key != r.key).map_or(Vec::new(), |d| r.cost_ratios(haproxy, d));
    let ratio = |v: &[f64]| if v.is_empty() { "–".to_string() } else { format!("{:.2}×", median(v)) };
    format!("{}, {}", ratio(&r.p99_ratios(haproxy)), ratio(&cost))
}

/// Openings per second per token source, beside relay's own store.
fn sources_section(w: &mut String, sources: &Result<crate::sources::SourceRates, String>) {
    let _ = writeln!(w, "\n## Token sources\n");
    let r = match sources {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}");
            return;
        }
    };
    let _ = writeln!(
        w,
        "Console openings per second through the CONNECT door (same count and concurrency as above) with the token \
         found in relay's own store (`memory`), checked as a signed token (`jwt`, HS256, plus the store's look-up for a \
         revocation), or read from nova's `console_auth_tokens` (`nova`, a local MariaDB, one SELECT on the unique \
         hash index per opening); one relay each, in rounds over the three; the median round and its ratio to `store`.\n"
    );
    openings_table(w, "source", &r.rates, &r.cpu_ms, ("store", "nova", "mariadbd"));
}

/// A table of openings per second per relay (median round, ratio to `base`, every round,
/// CPU per opening of relay and of the server only `uses_server` talks to).
fn openings_table(
    w: &mut String,
    kind: &str,
    rates: &[(&'static str, Vec<f64>)],
    cpu_ms: &[(&'static str, f64, f64)],
    (base, uses_server, server): (&str, &str, &str),
) {
    let _ = writeln!(
        w,
        "| {kind} | openings/s (median) | vs {base} | rounds | relay CPU ms per opening | {server} CPU ms per opening |\n|---|---|---|---|---|---|"
    );
    let base_rate = rates.iter().find(|(s, _)| *s == base).map(|(_, v)| median(v)).unwrap_or(0.0);
    for (name, rounds) in rates {
        let m = median(rounds);
        let vs = if base_rate > 0.0 { format!("{:.2}×", m / base_rate) } else { "–".into() };
        let list = rounds.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        let (relay_ms, server_ms) = cpu_ms.iter().find(|(s, _, _)| s == name).map_or((0.0, 0.0), |(_, a, b)| (*a, *b));
        let server_cell = if *name == uses_server { format!("{server_ms:.3}") } else { "–".into() };
        let _ = writeln!(w, "| {name} | {m:.0} | {vs} | {list} | {relay_ms:.3} | {server_cell} |");
    }
}

/// Openings per second per store, beside `memory`, and the reset fan-out's times.
fn stores_section(w: &mut String, stores: &Result<crate::stores::StoreRates, String>, notes: &mut Vec<String>) {
    let _ = writeln!(w, "\n## Store back-ends\n");
    let r = match stores {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}");
            return;
        }
    };
    let _ = writeln!(
        w,
        "Console openings per second through the CONNECT door (TCP connect, token, RFB to ServerInit, close; same count \
         and concurrency as the handshake column above) with each `[store] backend`, one relay process each, in rounds \
         over the three in turn; the median round, and its ratio to `memory` from the same run. `redis` is a local \
         redis-server (append-only file, fsync every second) on loopback.\n"
    );
    openings_table(w, "store", &r.rates, &r.cpu_ms, ("memory", "redis", "redis-server"));
    match &r.fanout {
        Ok(times) if !times.is_empty() => {
            let mut ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            ms.sort_by(f64::total_cmp);
            let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
            let _ = writeln!(
                w,
                "\nReset fan-out: three relays on that Redis, {} consoles of one instance spread over them, `instance reset` \
                 asked on the third; from the request to the end of the last console, over {} resets: p50 {:.2} ms, p99 \
                 {:.2} ms, max {:.2} ms.",
                r.consoles_per_reset,
                ms.len(),
                at(0.5),
                at(0.99),
                ms[ms.len() - 1]
            );
        }
        Ok(_) => {}
        Err(e) => notes.push(format!("reset fan-out: {e}")),
    }
}
