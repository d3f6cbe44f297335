#!/usr/bin/env node
// Drive a noVNC page in headless Chromium and check the console state.
//
//   node novnc.mjs --url URL [--expect connected|securityfailure|disconnected|credentials]
//                  [--password PW] [--type-password PW] [--screenshot FILE]
//                  [--timeout-ms N] [--verbose]
//
// Works with tests/browser/console.html (reads window.consoleState) and with
// noVNC's vnc_lite.html (reads the #status text, answers window.prompt).
// Prints one JSON line on stdout; exit code 0 iff the expectation was met.

import { chromium } from 'playwright-core';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const USAGE = 'usage: node novnc.mjs --url URL ' +
  '[--expect connected|securityfailure|disconnected|credentials] ' +
  '[--password PW] [--type-password PW] [--screenshot FILE] [--timeout-ms N] [--chromium-arg ARG]... [--verbose]';
const EXPECTS = ['connected', 'securityfailure', 'disconnected', 'credentials'];
const CHROMIUM = process.env.RELAY_CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
// Extra time allowed on top of --timeout-ms for launching and closing the
// browser before the hard timeout kills everything.
const HARD_TIMEOUT_SLACK_MS = 10000;

const started = Date.now();
let emitted = false;

function emit(result) {
  if (emitted) return;
  emitted = true;
  const out = {
    ok: false, state: null, reason: null, width: 0, height: 0, colours: 0,
    ...result,
    elapsedMs: Date.now() - started,
  };
  process.stdout.write(JSON.stringify(out) + '\n');
}

function parseArgs(argv) {
  const opts = { expect: 'connected', timeoutMs: 20000, verbose: false, chromiumArgs: [] };
  const valueOpts = {
    '--url': 'url', '--expect': 'expect', '--password': 'password',
    '--type-password': 'typePassword', '--screenshot': 'screenshot', '--timeout-ms': 'timeoutMs',
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    if (arg === '--verbose') { opts.verbose = true; continue; }
    if (arg === '--help' || arg === '-h') { process.stderr.write(USAGE + '\n'); process.exit(0); }
    const key = valueOpts[arg];
    if (!key && arg !== '--chromium-arg') throw new Error(`unknown argument ${arg}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      value = argv[++i];
    }
    // Repeatable: extra Chromium switches, e.g. trusting a test certificate by its key.
    if (arg === '--chromium-arg') opts.chromiumArgs.push(value);
    else opts[key] = value;
  }
  if (!opts.url) throw new Error('--url is required');
  if (!EXPECTS.includes(opts.expect)) throw new Error(`--expect must be one of ${EXPECTS.join(', ')}`);
  opts.timeoutMs = Number(opts.timeoutMs);
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) throw new Error('--timeout-ms must be a positive number');
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  emit({ reason: `${e.message}; ${USAGE}` });
  process.exit(2);
}

const log = (...a) => { if (opts.verbose) process.stderr.write(`[novnc ${Date.now() - started}ms] ${a.join(' ')}\n`); };

// --password is passed to the page as its `password` URL parameter, which both
// console.html and vnc_lite.html offer to the server up front.
function pageUrl() {
  if (opts.password === undefined) return opts.url;
  const u = new URL(opts.url);
  const extra = 'password=' + encodeURIComponent(opts.password);
  u.search = u.search.length > 1 ? u.search + '&' + extra : '?' + extra;
  return u.href;
}

// If the driver itself is SIGKILLed, Playwright cannot close Chromium. Launch it
// through a wrapper that asks the kernel to kill it when the driver dies
// (setpriv --pdeathsig); its helper processes follow the browser process.
let wrapperDir = null;
function chromiumExecutable() {
  const setpriv = '/usr/bin/setpriv';
  if (!existsSync(setpriv)) return CHROMIUM;
  wrapperDir = mkdtempSync(join(tmpdir(), 'relay-novnc-'));
  const wrapper = join(wrapperDir, 'chromium');
  const quoted = "'" + CHROMIUM.replace(/'/g, "'\\''") + "'";
  writeFileSync(wrapper, `#!/bin/sh\nexec ${setpriv} --pdeathsig KILL ${quoted} "$@"\n`, { mode: 0o755 });
  return wrapper;
}

let browser = null;

async function shutdown(code) {
  const b = browser;
  browser = null;
  if (b) {
    // browser.close() kills the Chromium process group; guard against a hang.
    await Promise.race([b.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  }
  if (wrapperDir) rmSync(wrapperDir, { recursive: true, force: true });
  // Playwright's exit handler SIGKILLs any browser still running.
  process.exit(code);
}

const hardTimer = setTimeout(() => {
  emit({ reason: `hard timeout after ${opts.timeoutMs + HARD_TIMEOUT_SLACK_MS} ms` });
  shutdown(1);
}, opts.timeoutMs + HARD_TIMEOUT_SLACK_MS);

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => { emit({ reason: `killed by ${sig}` }); shutdown(1); });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// QEMU NUL-terminates its security failure reason; drop control characters.
const clean = (text) => text == null ? null
  : String(text).replace(/[\u0000-\u001f]+/g, ' ').replace(/ +\)/g, ')').trim();

// Runs in the page: the console state, from whichever page this is.
function readPageState() {
  const s = window.consoleState;
  if (s && typeof s === 'object') {
    return { page: 'console', status: s.status, reason: s.reason ?? null, desktopName: s.desktopName ?? null };
  }
  const el = document.getElementById('status');
  return { page: 'status-text', text: el ? el.textContent.trim() : null };
}

// Runs in the page: size and number of distinct colours of the noVNC canvas.
function readCanvas() {
  const canvas = document.querySelector('#screen canvas') || document.querySelector('canvas');
  if (!canvas || !canvas.width || !canvas.height) {
    return { width: canvas ? canvas.width : 0, height: canvas ? canvas.height : 0, colours: 0 };
  }
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const px = new Uint32Array(data.buffer, data.byteOffset, data.byteLength / 4);
  const seen = new Set();
  for (let i = 0; i < px.length && seen.size < 256; i++) seen.add(px[i]);
  return { width: canvas.width, height: canvas.height, colours: seen.size };
}

// Security failures in vnc_lite.html only show up as a failed connection in
// the status text; noVNC logs the cause on the console.
const SECURITY_LOG = /Security negotiation failed|Security handshake failed|Authentication failure/i;
// noVNC's own error line for a failed connection, e.g. "Failed when connecting:
// Connection closed (code: 1011, reason: ...)": the best reason for a disconnect.
const NOVNC_FAILURE_LOG = /^(Failed when connecting|Failed while connected|Failed when disconnecting|RFB failure):/;

async function main() {
  const consoleLog = [];
  let securityLog = null;
  let failureLog = null;
  let promptSeen = false;
  let typed = false;

  browser = await chromium.launch({
    executablePath: chromiumExecutable(),
    headless: true,
    args: [...CHROMIUM_ARGS, ...opts.chromiumArgs],
    timeout: Math.min(opts.timeoutMs, 30000),
  });
  log('browser', browser.version());
  const deadline = started + opts.timeoutMs;
  const result = { state: null, reason: null, width: 0, height: 0, colours: 0 };
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(opts.timeoutMs);
  // page.evaluate() has no timeout of its own (a busy page never answers).
  const evaluate = (fn) => {
    let timer;
    const expire = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error('page did not answer before the deadline')),
        Math.max(0, deadline - Date.now()));
    });
    return Promise.race([page.evaluate(fn), expire]).finally(() => clearTimeout(timer));
  };

  page.on('console', (m) => {
    if (m.type() !== 'error' && m.type() !== 'warning') return;
    const text = m.text();
    // Our own canvas readback; failed loads are reported by the 'response' handler.
    if (/willReadFrequently|^Failed to load resource/.test(text)) return;
    log('console.' + m.type(), text);
    consoleLog.push(clean(text));
    if (consoleLog.length > 20) consoleLog.shift();
    if (NOVNC_FAILURE_LOG.test(text)) failureLog = clean(text);
    if (SECURITY_LOG.test(text) && !securityLog) securityLog = clean(text);
  });
  page.on('response', (r) => {
    if (r.status() < 400 || /\/favicon\.ico$/.test(new URL(r.url()).pathname)) return;
    log('http', r.status(), r.url());
    consoleLog.push(`HTTP ${r.status()} for ${r.url()}`);
  });
  page.on('websocket', (ws) => {
    log('websocket', ws.url());
    result.websocket = ws.url();
  });
  page.on('pageerror', (e) => { log('pageerror', e.message); consoleLog.push('pageerror: ' + e.message); });
  // vnc_lite.html asks for the password with window.prompt().
  page.on('dialog', async (d) => {
    log('dialog', d.type(), JSON.stringify(d.message()));
    promptSeen = true;
    try {
      if (d.type() === 'prompt' && opts.typePassword !== undefined && !typed) {
        typed = true;
        await d.accept(opts.typePassword);
      } else {
        await d.dismiss();
      }
    } catch (e) { log('dialog error', e.message); }
  });

  const finish = async (ok, reason) => {
    result.ok = ok;
    if (reason !== undefined) result.reason = reason;
    if (!ok && consoleLog.length) result.console = consoleLog.slice(-5);
    if (opts.screenshot) {
      try { await page.screenshot({ path: opts.screenshot, timeout: 5000 }); } catch (e) { log('screenshot failed', e.message); }
    }
    // A viewer that is done says so: where the page exposes its RFB object (console.html),
    // disconnect it and wait for the close handshake, so the console ends with a WebSocket
    // Close rather than with whatever killing Chromium leaves (a reset, when the server's
    // updates were still unread).
    try {
      const closed = await page.evaluate(async () => {
        if (!window.rfb || !window.consoleState || window.consoleState.status !== 'connected') return null;
        window.rfb.disconnect();
        for (let i = 0; i < 50 && window.consoleState.status !== 'disconnected'; i++) {
          await new Promise((r) => setTimeout(r, 100));
        }
        return window.consoleState.status === 'disconnected';
      });
      if (closed === false) log('the console did not close within 5 s');
    } catch (e) { log('disconnecting failed', e.message.split('\n')[0]); }
    return result;
  };

  const url = pageUrl();
  log('goto', url);
  let response;
  try {
    response = await page.goto(url, { waitUntil: 'load', timeout: Math.max(1000, deadline - Date.now()) });
  } catch (e) {
    return finish(false, `loading page failed: ${e.message.split('\n')[0]}`);
  }
  if (response && !response.ok()) {
    return finish(false, `loading page failed: HTTP ${response.status()}`);
  }

  // Map a page's state to {state, reason, desktopName}.
  const classify = (s) => {
    result.page = s.page;
    if (s.page === 'console') return { state: s.status, reason: s.reason, desktopName: s.desktopName };
    result.statusText = s.text;
    const text = s.text || '';
    if (promptSeen && !typed) return { state: 'credentials', reason: 'password prompt' };
    if (/^Connected\b/.test(text)) {
      const m = text.match(/ to (.*)$/);
      return { state: 'connected', reason: null, desktopName: m ? m[1] : null };
    }
    if (/^Disconnected/.test(text)) return { state: 'disconnected', reason: 'closed cleanly' };
    if (/went wrong|connection is closed|^Failed/i.test(text)) {
      if (securityLog) return { state: 'securityfailure', reason: securityLog };
      return { state: 'disconnected', reason: 'connection closed unexpectedly' };
    }
    return { state: 'connecting', reason: null };
  };

  let lastState = null;
  let connectedAt = null;
  while (Date.now() < deadline) {
    let s;
    try {
      s = classify(await evaluate(readPageState));
    } catch (e) {
      // Navigation in progress or page crashed; retry until the deadline.
      log('evaluate failed', e.message.split('\n')[0]);
      await sleep(200);
      continue;
    }
    if (s.state !== lastState) log('state', s.state, s.reason || '');
    lastState = s.state;
    result.state = s.state;
    result.reason = clean(s.reason);
    if (s.desktopName) result.desktopName = s.desktopName;
    if (s.state === 'disconnected' && failureLog) result.reason = failureLog;

    if (s.state === 'credentials') {
      if (opts.expect === 'credentials') return finish(true);
      if (opts.typePassword !== undefined && !typed) {
        typed = true;
        log('typing password');
        await page.fill('#password', opts.typePassword);
        await page.click('#send-password');
        continue;
      }
      return finish(false, typed ? 'server asked for a password again'
        : 'server asked for a password (use --password or --type-password)');
    } else if (s.state === 'connected') {
      connectedAt ??= Date.now();
      if (opts.expect === 'connected') {
        // The guest may not have drawn anything yet: retry until the deadline.
        try {
          Object.assign(result, await evaluate(readCanvas));
        } catch (e) {
          log('reading canvas failed', e.message.split('\n')[0]);
        }
        if (result.width > 0 && result.height > 0 && result.colours >= 2) return finish(true);
      } else if (opts.expect !== 'disconnected') {
        return finish(false, `expected ${opts.expect}, but the console connected`);
      }
    } else if (s.state === 'disconnected' || s.state === 'securityfailure') {
      if (opts.expect === s.state) return finish(true);
      return finish(false, `expected ${opts.expect}, got ${s.state}` + (result.reason ? `: ${result.reason}` : ''));
    }
    await sleep(100);
  }
  if (opts.expect === 'connected' && result.state === 'connected') {
    return finish(false, `connected, but the screen stayed blank (${result.width}x${result.height}, ` +
      `${result.colours} colour(s)) for ${Date.now() - connectedAt} ms`);
  }
  return finish(false, `timed out after ${opts.timeoutMs} ms waiting for ${opts.expect} (state: ${result.state})`);
}

main().then(
  (result) => { clearTimeout(hardTimer); emit(result); return shutdown(result.ok ? 0 : 1); },
  (e) => { clearTimeout(hardTimer); emit({ reason: `driver error: ${e.message.split('\n')[0]}` }); return shutdown(1); },
);
