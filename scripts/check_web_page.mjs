// Headless-Chromium check of the web page that `selective serve` shows at `/`.
// Run through scripts/check_web_page.sh, which installs playwright-core and sets PLAYWRIGHT_DIR.
// Usage: node check_web_page.mjs BASE_URL SCREENSHOT.png
// Env: CHROMIUM (default /usr/bin/chromium), CHECK_TIMEOUT_MS (per generation, default 180000).
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [base0, shot] = process.argv.slice(2);
if (!base0 || !shot) { console.error('usage: check_web_page.mjs BASE_URL SCREENSHOT.png'); process.exit(2); }
const base = base0.replace(/\/+$/, '');
const require = createRequire(join(process.env.PLAYWRIGHT_DIR || '/tmp/selective-web-check', 'x.js'));
const { chromium } = require('playwright-core');
const TIMEOUT = Number(process.env.CHECK_TIMEOUT_MS || 180000);

class CheckFailed extends Error {}
const fail = (msg) => { throw new CheckFailed(msg); };
const log = (msg) => console.log(`check_web_page: ${msg}`);

const profile = mkdtempSync(join(tmpdir(), 'selective-web-check-profile-'));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1100, height: 1000 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = context.pages()[0] || await context.newPage();
  const pageErrors = [], posts = [], foreign = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') log(`(browser console) ${m.text()}`); });
  page.on('request', (r) => {
    if (!r.url().startsWith(base + '/') && !r.url().startsWith('data:')) foreign.push(r.url());
    if (r.method() === 'POST') posts.push({ url: r.url(), body: r.postDataJSON() });
  });

  // --- load ---
  const resp = await page.goto(base + '/', { waitUntil: 'load', timeout: 30000 }).catch((e) => fail(`cannot load ${base}/: ${e.message}`));
  if (!resp.ok()) fail(`GET / answered HTTP ${resp.status()}`);
  const ctype = resp.headers()['content-type'] || '';
  if (!ctype.startsWith('text/html')) fail(`GET / has Content-Type "${ctype}", expected text/html`);
  for (const id of ['prompt', 'generate', 'stop', 'output', 'status', 'mode', 'max_tokens', 'temperature', 'seed', 'model']) {
    if (await page.locator('#' + id).count() !== 1) fail(`the page has no element #${id}`);
  }
  await page.waitForFunction(() => {
    const m = document.getElementById('model').textContent.trim();
    return m && !m.startsWith('loading') && !m.startsWith('(');
  }, null, { timeout: 30000 }).catch(async () =>
    fail(`the model name never appeared (model: "${await page.textContent('#model')}", status: "${await page.textContent('#status')}")`));
  const model = (await page.textContent('#model')).trim();
  log(`page loaded, model "${model}"`);

  // Count the distinct output texts seen while it grows (a MutationObserver callback runs once per
  // burst of DOM changes, so a page that renders everything at once shows one step only).
  await page.evaluate(() => {
    window.__steps = [];
    new MutationObserver(() => {
      const t = document.getElementById('output').textContent;
      if (window.__steps[window.__steps.length - 1] !== t) window.__steps.push(t);
    }).observe(document.getElementById('output'), { childList: true, subtree: true, characterData: true });
  });
  const resetSteps = () => page.evaluate(() => { window.__steps = []; });
  const steps = () => page.evaluate(() => window.__steps);

  // Click Generate and wait until the status leaves "running"; returns {state, text, tokens, request}.
  async function generate(what) {
    const run = Number(await page.getAttribute('#status', 'data-run'));
    const nPosts = posts.length;
    await page.click('#generate');
    await page.waitForFunction((r) => {
      const s = document.getElementById('status');
      return Number(s.dataset.run) > r && s.dataset.state !== 'running';
    }, run, { timeout: TIMEOUT, polling: 100 }).catch(async () =>
      fail(`${what}: not finished after ${TIMEOUT} ms (status: "${await page.textContent('#status')}")`));
    const st = await page.$eval('#status', (s) => ({ state: s.dataset.state, text: s.textContent, tokens: Number(s.dataset.tokens) }));
    st.request = posts[nPosts] ? posts[nPosts].body : null;
    if (!st.request) fail(`${what}: the page sent no POST request`);
    return st;
  }

  // --- 1. completion, streamed ---
  await page.selectOption('#mode', 'completion');
  await page.fill('#prompt', 'The selective state space model');
  await page.fill('#max_tokens', '40');
  await page.fill('#seed', '1234');
  await resetSteps();
  let st = await generate('completion');
  if (st.state !== 'done') fail(`completion: status is "${st.text}" (state ${st.state}), expected it to finish`);
  const r1 = st.request;
  if (posts[posts.length - 1].url !== base + '/v1/completions') fail(`completion: POSTed to ${posts[posts.length - 1].url}`);
  if (r1.prompt !== 'The selective state space model' || r1.max_tokens !== 40 || r1.seed !== 1234 || r1.stream !== true || r1.model !== model)
    fail(`completion: unexpected request body ${JSON.stringify(r1)}`);
  const out1 = await page.textContent('#output');
  if (!out1.trim()) fail(`completion: the output is empty (status: "${st.text}")`);
  const s1 = (await steps()).filter((t) => t.length > 0);
  if (s1.length < 2) fail(`completion: the output appeared in ${s1.length} step(s); expected it to stream in several`);
  if (!(s1[0].length < s1[s1.length - 1].length && out1.startsWith(s1[0]))) fail('completion: the output did not grow by appending');
  if (/\bchunks\b/.test(st.text)) fail(`completion: the stream carried no usage chunk (stream_options.include_usage); status "${st.text}"`);
  if (!(st.tokens > 0 && st.tokens <= 40)) fail(`completion: status reports ${st.tokens} tokens, expected 1..40 (max_tokens)`);
  if (!/first token \d+ ms/.test(st.text)) fail(`completion: status lacks the time to first token: "${st.text}"`);
  if (st.tokens > 1 && !/tokens\/s/.test(st.text)) fail(`completion: status lacks tokens/s: "${st.text}"`);
  log(`completion OK: ${out1.length} chars in ${s1.length} visible steps; status "${st.text}"`);
  await page.screenshot({ path: shot, fullPage: true });
  log(`screenshot written to ${shot}`);

  // --- 2. Stop aborts a running generation ---
  await page.fill('#max_tokens', '400');
  await page.fill('#seed', '');
  const runBefore = Number(await page.getAttribute('#status', 'data-run'));
  await page.click('#generate');
  await page.waitForFunction((r) => {
    const s = document.getElementById('status');
    return Number(s.dataset.run) > r && (document.getElementById('output').textContent.length > 0 || s.dataset.state !== 'running');
  }, runBefore, { timeout: TIMEOUT, polling: 50 }).catch(() => fail('stop: nothing arrived in time'));
  await page.click('#stop', { timeout: 5000 }).catch(() => {});   // disabled if it finished already
  await page.waitForFunction(() => document.getElementById('status').dataset.state !== 'running', null, { timeout: 30000 })
    .catch(() => fail('stop: still running 30 s after Stop was clicked'));
  st = await page.$eval('#status', (s) => ({ state: s.dataset.state, text: s.textContent }));
  if (st.state === 'done') log('stop: WARNING the generation finished before Stop took effect; Stop not exercised');
  else if (st.state !== 'stopped') fail(`stop: status is "${st.text}" (state ${st.state}), expected "stopped"`);
  else log(`stop OK: "${st.text}"`);
  if (await page.isDisabled('#generate')) fail('stop: Generate is still disabled');

  // --- 3. an error from the server is shown ---
  await page.fill('#max_tokens', '5');
  await page.fill('#temperature', '-1');
  st = await generate('error');
  if (st.state !== 'error' || !/HTTP 4\d\d/.test(st.text) || !/temperature/i.test(st.text))
    fail(`error: temperature -1 should be refused with a 4xx whose message names temperature; status: "${st.text}"`);
  log(`error OK: "${st.text}"`);
  await page.fill('#temperature', '0.8');

  // --- 4. chat, two turns ---
  await page.selectOption('#mode', 'chat');
  await page.click('#reset');
  await page.fill('#max_tokens', '20');
  await page.fill('#seed', '7');
  await page.fill('#prompt', 'Hello! Who are you?');
  await resetSteps();
  st = await generate('chat turn 1');
  if (st.state !== 'done') fail(`chat turn 1: status is "${st.text}" (state ${st.state})`);
  if (posts[posts.length - 1].url !== base + '/v1/chat/completions') fail(`chat: POSTed to ${posts[posts.length - 1].url}`);
  const m1 = st.request.messages;
  if (!Array.isArray(m1) || m1.length !== 1 || m1[0].role !== 'user' || m1[0].content !== 'Hello! Who are you?' || st.request.prompt !== undefined)
    fail(`chat turn 1: unexpected request body ${JSON.stringify(st.request)}`);
  const reply1 = await page.$$eval('#output .msg.assistant .content', (e) => e.map((x) => x.textContent));
  if (reply1.length !== 1 || !reply1[0]) fail(`chat turn 1: expected one non-empty assistant reply, got ${JSON.stringify(reply1)}`);
  if ((await steps()).filter((t) => t.length > 0).length < 3) fail('chat turn 1: the reply did not stream in several steps');
  if (await page.inputValue('#prompt') !== '') fail('chat turn 1: the prompt box was not cleared');
  await page.fill('#prompt', 'Tell me more.');
  st = await generate('chat turn 2');
  if (st.state !== 'done') fail(`chat turn 2: status is "${st.text}" (state ${st.state})`);
  const want = [{ role: 'user', content: 'Hello! Who are you?' }, { role: 'assistant', content: reply1[0] }, { role: 'user', content: 'Tell me more.' }];
  const m2 = (st.request.messages || []).map((m) => ({ role: m.role, content: m.content }));
  if (JSON.stringify(m2) !== JSON.stringify(want))
    fail(`chat turn 2: messages should carry the first turn; sent ${JSON.stringify(st.request.messages)}`);
  const shown = await page.$$eval('#output .msg', (e) => e.map((x) => x.className));
  if (shown.length !== 4 || !(await page.textContent('#output .msg:last-child .content')).length)
    fail(`chat turn 2: expected 4 messages with a non-empty last reply on the page, got ${JSON.stringify(shown)}`);
  log(`chat OK: two turns, second request carried ${m2.length} messages; status "${st.text}"`);
  await page.screenshot({ path: shot.replace(/(\.png)?$/i, '-chat.png'), fullPage: true });

  if (foreign.length) fail(`the page fetched outside ${base}: ${foreign.join(', ')}`);
  if (pageErrors.length) fail(`JavaScript errors on the page: ${pageErrors.join(' | ')}`);
  log('all checks passed');
} catch (e) {
  console.error(`check_web_page: FAILED: ${e instanceof CheckFailed ? e.message : e.stack || e}`);
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
