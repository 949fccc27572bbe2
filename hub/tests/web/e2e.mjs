// Drives the hub's web interface in headless Chromium (Debian's
// /usr/bin/chromium, through playwright-core). Run by hub/tests/it/web_e2e.rs:
//
//   node e2e.mjs <hub url> <admin token> <viewer token> <screenshot.png> \
//     <canary deployment id> <device id> <live model> <idle device id>
//
// First the telemetry pages, with the real series the test made before
// starting the browser: the canary deployment plots its old and new version
// (latency, accuracy, errors, requests; devices by state) with at least two
// points per version, one colour per version throughout, distinct axis
// ticks with units and clock times; the device page plots the same and
// shows the operator's rollback evidence as a line, not JSON; the range
// picker and the open evidence survive live refreshes. A device that never
// reported says so. Screenshots: deployment-telemetry.png and
// device-telemetry.png beside <screenshot.png>.
//
// As admin: sign in, upload digits_mlp_v1.onnx, deploy it to site=web,
// with two policy fields set in the form and shown on the deployment page,
// and watch the deployment reach "serving" on the connected test agent
// without reloading the page; save a screenshot. The audit log filtered by
// outcome, with no change-feed tickets in it; every view, the telemetry
// pages among them, fits a 420 px window. As viewer: no deploy
// button, and the deploy API answers 403 when called from the page anyway.
// Exits non-zero with a message on the first failed step.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [url, adminToken, viewerToken, shot, canary, liveDevice, liveModel, idleDevice] = process.argv.slice(2);
if (!idleDevice) {
  console.error('usage: node e2e.mjs <hub url> <admin token> <viewer token> <screenshot.png> '
    + '<canary deployment id> <device id> <live model> <idle device id>');
  process.exit(64);
}
const here = dirname(fileURLToPath(import.meta.url));
const modelFile = resolve(here, '../../../models/digits/digits_mlp_v1.onnx');
const MODEL = 'digits';
const SERVING_TIMEOUT_MS = 120_000;

const profile = mkdtempSync(join(tmpdir(), 'sentinel-e2e-chromium-'));
const watchdog = setTimeout(() => { console.error('e2e: gave up after 4 minutes'); process.exit(2); }, 240_000);
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = context.pages()[0] || await context.newPage();
// CSP violations and script errors show up here; the page must have none.
const problems = [];
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));

/** A screenshot's path beside <screenshot.png>. */
const beside = (name) => join(dirname(shot), name);

/** A full-page screenshot from the top (scrolled, the sticky header is drawn mid-page). */
async function fullShot(path) {
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path, fullPage: true });
  console.log(`screenshot: ${path}`);
}

/**
 * What is wrong with the plots under `root`, metric by metric: fewer than
 * two points of a version, value ticks repeated, overlapping or without
 * their unit, time ticks that are not distinct clock times, a point whose
 * title does not name its version, a legend that does not name each one,
 * a version in two colours or two versions in one.
 */
async function plotProblems(root, versions, metrics) {
  return page.evaluate(({ root, versions, metrics }) => {
    const out = [];
    const box = document.querySelector(root);
    if (!box) return [`nothing at ${root}`];
    const units = { latency: / ms$/, accuracy: /%$/, errors: /%$/, requests: /\/s$/, states: /^\d+$/ };
    const fills = new Map(versions.map((v) => [v, new Set()]));
    const apart = (texts, axis) => texts.map((t) => t.getBoundingClientRect()).every((r, i, all) =>
      i === 0 || (axis === 'x' ? all[i - 1].right <= r.left : r.bottom <= all[i - 1].top));
    for (const m of metrics) {
      const plot = box.querySelector(`[data-metric="${m}"] svg.plot`);
      if (!plot) { out.push(`${m}: no plot`); continue; }
      const yt = [...plot.querySelectorAll('text.tick.y')], xt = [...plot.querySelectorAll('text.tick.x')];
      const ys = yt.map((t) => t.textContent), xs = xt.map((t) => t.textContent);
      if (ys.length < 2 || new Set(ys).size !== ys.length || !apart(yt, 'y')) out.push(`${m}: value ticks ${JSON.stringify(ys)} repeat or overlap`);
      if (!ys.every((y) => units[m].test(y))) out.push(`${m}: value ticks ${JSON.stringify(ys)} lack their unit`);
      if (xs.length < 2 || new Set(xs).size !== xs.length || !apart(xt, 'x')) out.push(`${m}: time ticks ${JSON.stringify(xs)} repeat or overlap`);
      if (!xs.every((x) => /\d\d:\d\d/.test(x))) out.push(`${m}: time ticks ${JSON.stringify(xs)} are not clock times`);
      if (m === 'states') continue;
      const legend = plot.parentElement.querySelector('.legend')?.textContent || '';
      for (const v of versions) {
        const dots = [...plot.querySelectorAll(`circle.pt[data-version="${v}"]`)];
        if (dots.length < 2) out.push(`${m}: ${dots.length} points of ${v}`);
        for (const d of dots) {
          const title = d.querySelector('title')?.textContent || '';
          if (!title.startsWith(v)) out.push(`${m}: a point of ${v} titled ${JSON.stringify(title)}`);
          fills.get(v).add(d.getAttribute('fill'));
        }
        if (!legend.includes(v)) out.push(`${m}: the legend ${JSON.stringify(legend)} does not name ${v}`);
      }
    }
    for (const [v, f] of fills) if (f.size > 1) out.push(`${v} is drawn in ${f.size} colours`);
    const colours = [...fills.values()].flatMap((f) => [...f].slice(0, 1));
    if (new Set(colours).size !== colours.length) out.push(`versions share a colour: ${colours}`);
    return out;
  }, { root, versions, metrics });
}

/** The mean of the values in the titles of a plot's points of `version` (`pattern` captures the number). */
async function meanOf(root, metric, version, pattern) {
  return page.evaluate(({ root, metric, version, pattern }) => {
    const re = new RegExp(pattern);
    const vs = [...document.querySelectorAll(`${root} [data-metric="${metric}"] circle.pt[data-version="${version}"] title`)]
      .map((t) => re.exec(t.textContent)).filter(Boolean).map((m) => Number(m[1]));
    return vs.length ? vs.reduce((a, b) => a + b, 0) / vs.length : null;
  }, { root, metric, version, pattern });
}

function fail(what, problems) {
  if (problems.length) throw new Error(`${what}:\n${problems.join('\n')}`);
}

let step = 'start';
async function signIn(token, role) {
  await page.goto(`${url}/`);
  await page.waitForSelector('#token', { state: 'visible' });
  await page.fill('#token', token);
  await page.click('#signin-submit');
  await page.waitForFunction((r) => document.querySelector('#who-role')?.textContent === r, role);
}

try {
  step = 'sign in as admin';
  await signIn(adminToken, 'admin');
  await page.waitForSelector('#live.on', { timeout: 15_000 });

  step = `deployment ${canary}: old against new over time`;
  const VERSIONS = ['1.0.0', '2.0.0'];
  const METRICS = ['latency', 'accuracy', 'errors', 'requests'];
  await page.goto(`${url}/ui/#/deployments/${canary}`);
  await page.waitForSelector('#deployment-telemetry svg.plot');
  fail('the deployment\'s plots', await plotProblems('#deployment-telemetry', VERSIONS, [...METRICS, 'states']));
  const legend = await page.locator('#deployment-telemetry [data-metric="latency"] .legend').textContent();
  if (!legend.includes('2.0.0 (new)') || !legend.includes('1.0.0 (old)')) {
    throw new Error(`the legend says ${JSON.stringify(legend)}, not which version is new and which old`);
  }
  const states = await page.evaluate(() => [...document.querySelectorAll(
    '#deployment-telemetry [data-metric="states"] path[data-state]')].map((p) => p.dataset.state));
  for (const st of ['canary', 'rolled_back']) {
    if (!states.includes(st)) throw new Error(`devices by state shows ${states}, not ${st}`);
  }
  // The degraded model is plotted as what it is: less accurate than the old one.
  const acc = await Promise.all(VERSIONS.map((v) => meanOf('#deployment-telemetry', 'accuracy', v, 'accuracy ([\\d.]+)%')));
  if (!(acc[1] < acc[0] - 10)) throw new Error(`accuracy of 1.0.0 and 2.0.0 plotted as ${acc}`);
  await fullShot(beside('deployment-telemetry.png'));

  step = `device ${liveDevice}: versions over time, and the rollback's evidence`;
  const deviceRoot = `#device-telemetry [data-model="${liveModel}"]`;
  await page.goto(`${url}/ui/#/devices/${encodeURIComponent(liveDevice)}`);
  await page.waitForSelector(`${deviceRoot} svg.plot`);
  fail('the device\'s plots', await plotProblems(deviceRoot, VERSIONS, METRICS));
  const rollback = page.locator('#device-events tr[data-kind="rolled_back"]').first();
  const line = await rollback.locator('details.evidence summary').textContent();
  for (const want of [/p95 [\d.]+ ms vs [\d.]+ ms/, /accuracy \d+% vs \d+% over [\d,]+ samples/, /switched in [\d,]+ µs/]) {
    if (!want.test(line)) throw new Error(`the rollback's evidence reads ${JSON.stringify(line)}: no ${want}`);
  }
  if (/[{}]/.test(await rollback.textContent())) throw new Error('the rollback\'s row shows JSON');
  await rollback.locator('details.evidence summary').click();
  await page.waitForSelector('#device-events details.evidence[open] table');
  // The range picker: the last 15 minutes, kept when the page refreshes.
  await page.selectOption('#device-telemetry-card select.range', '15m');
  await page.waitForFunction(() => {
    const d = document.querySelector('#device-telemetry')?.dataset;
    return d && Number(d.toMs) - Number(d.fromMs) <= 15 * 60_000 + 5_000;
  });
  fail('the device\'s plots over 15 min', await plotProblems(deviceRoot, VERSIONS, METRICS));
  // The next report refreshes the page: the range and the open evidence stay.
  await page.evaluate(() => { document.querySelector('#device-telemetry').dataset.seen = 'yes'; });
  await page.waitForFunction(() => document.querySelector('#device-telemetry')?.dataset.seen !== 'yes');
  const kept = await page.evaluate(() => [document.querySelector('#device-telemetry-card select.range').value,
    document.querySelectorAll('#device-events details.evidence[open]').length]);
  if (kept[0] !== '15m' || kept[1] !== 1) throw new Error(`after a refresh: range ${kept[0]}, ${kept[1]} evidence open`);
  await fullShot(beside('device-telemetry.png'));

  step = `device ${idleDevice}, which never reported`;
  await page.goto(`${url}/ui/#/devices/${encodeURIComponent(idleDevice)}`);
  await page.waitForSelector('#no-telemetry:text("No telemetry yet")');

  step = 'upload a version';
  await page.goto(`${url}/ui/#/models`);
  const form = page.locator('#upload-form');
  await form.locator('[name=model]').fill(MODEL);
  await form.locator('[name=version]').fill('1.0.0');
  await form.locator('[name=stage]').selectOption('staging');
  await form.locator('[name=accuracy]').fill('0.9694');
  await form.locator('[name=hardware]').fill('x86_64,aarch64');
  await form.locator('[name=file]').setInputFiles(modelFile);
  await page.click('#upload-submit');
  await page.waitForSelector('.deploy-btn[data-version="1.0.0"]', { timeout: 30_000 });

  step = 'deploy it';
  await page.click('.deploy-btn[data-version="1.0.0"]');
  // No target: the form refuses to submit (a deploy needs an explicit one).
  await page.click('#deploy-submit');
  if (await page.evaluate(() => document.querySelector('#deploy-form [name=target]').validity.valid)) {
    throw new Error('the deploy form accepted an empty target');
  }
  await page.locator('#deploy-form [name=target]').fill('site=web');
  // Two policy fields through the form; the rest keep the defaults shown.
  const fields = await page.locator('#deploy-policy input').count();
  if (fields !== 12) throw new Error(`the deploy form has ${fields} policy fields, not 12`);
  await page.click('#deploy-policy summary');
  await page.locator('#deploy-form [name="policy.max_error_rate"]').fill('0.1');
  await page.locator('#deploy-form [name="policy.max_restarts"]').fill('5');
  await page.click('#deploy-submit');
  await page.waitForFunction(() => /^#\/deployments\/\d+$/.test(location.hash));
  const deployment = await page.evaluate(() => location.hash.split('/')[2]);
  await page.waitForSelector('#policy:text("max_error_rate 0.1; max_restarts 5")');
  await page.waitForSelector('#effective-policy:text("max_restarts 5")');

  step = `watch deployment ${deployment} reach serving (live, no reload)`;
  const loads = await page.evaluate(() => performance.getEntriesByType('navigation').length);
  await page.waitForSelector('#rollout-devices [data-state="serving"]', { timeout: SERVING_TIMEOUT_MS });
  await page.waitForSelector('[data-count="serving"] b:text("1")');
  const reloaded = await page.evaluate((n) => performance.getEntriesByType('navigation').length !== n, loads);
  if (reloaded) throw new Error('the page reloaded');
  await fullShot(shot);

  step = 'device view';
  const device = await page.locator('#rollout-devices [data-device]').first().getAttribute('data-device');
  await page.goto(`${url}/ui/#/devices/${encodeURIComponent(device)}`);
  await page.waitForSelector('#device-telemetry svg.plot');
  // Value-axis labels of every plot are distinct (they once read 0.06 four times).
  const repeated = await page.evaluate(() => [...document.querySelectorAll('svg.plot')].filter((svg) => {
    const labels = [...svg.querySelectorAll('text.tick')].map((t) => t.textContent);
    return new Set(labels).size !== labels.length;
  }).length);
  if (repeated) throw new Error(`${repeated} plots repeat a value-axis label`);
  const deviceShot = shot.replace(/\.png$/, '-device.png');
  await fullShot(deviceShot);

  step = 'the version says where it runs';
  await page.goto(`${url}/ui/#/models/${MODEL}`);
  await page.waitForSelector('[data-runs="1.0.0"]:text("runs on 1")');
  await page.waitForSelector('#publisher-requirement:text("Publisher signature: not required")');

  step = 'audit view, filtered';
  await page.goto(`${url}/ui/#/audit`);
  await page.waitForSelector('#audit-table');
  await page.selectOption('#audit-outcome', 'ok');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('#audit-table tbody tr')];
    return rows.length > 0 && rows.every((r) => r.children[5].textContent.trim() === 'ok');
  });
  const tickets = await page.evaluate(() => [...document.querySelectorAll('#audit-table code')]
    .filter((c) => c.textContent.includes('/events/ticket')).length);
  if (tickets) throw new Error(`${tickets} change-feed tickets in the audit log`);
  const auditShot = shot.replace(/\.png$/, '-audit.png');
  await fullShot(auditShot);

  step = 'a 420 px window';
  await page.setViewportSize({ width: 420, height: 800 });
  const narrowTelemetry = {
    [`#/deployments/${canary}`]: ['#deployment-telemetry', [...METRICS, 'states'], 'deployment-telemetry-narrow.png'],
    [`#/devices/${encodeURIComponent(liveDevice)}`]: [deviceRoot, METRICS, 'device-telemetry-narrow.png'],
  };
  for (const view of ['#/models', `#/models/${MODEL}`, '#/deployments', '#/devices', ...Object.keys(narrowTelemetry)]) {
    await page.goto(`${url}/ui/${view}`);
    await page.waitForSelector('main .card:visible');
    const wide = await page.evaluate(() => document.documentElement.scrollWidth);
    if (wide > 420) throw new Error(`${view} is ${wide} px wide in a 420 px window`);
    const telemetry = narrowTelemetry[view];
    if (telemetry) {
      const [root, metrics, name] = telemetry;
      await page.waitForSelector(`${root} svg.plot`);
      fail(`${view} at 420 px`, await plotProblems(root, VERSIONS, metrics));
      await fullShot(beside(name));
    }
  }
  const narrowShot = shot.replace(/\.png$/, '-narrow.png');
  await fullShot(narrowShot);
  await page.setViewportSize({ width: 1280, height: 900 });

  step = 'sign in as viewer';
  await page.click('#sign-out');
  await signIn(viewerToken, 'viewer');
  await page.goto(`${url}/ui/#/models/${MODEL}`);
  await page.waitForSelector('text=Versions');
  await page.waitForSelector('td >> text=1.0.0');
  const buttons = await page.locator('.deploy-btn, #rollback-btn, #upload-form').count();
  if (buttons !== 0) throw new Error(`a viewer sees ${buttons} deploy, rollback or upload controls`);

  if (problems.length) throw new Error(`the page logged errors (CSP violations among them?):\n${problems.join('\n')}`);

  step = 'deploy as viewer through the API';
  const status = await page.evaluate(async (model) => {
    const r = await fetch(`/api/v1/models/${model}/deploy`, {
      method: 'POST',
      headers: {
        Authorization: `Bearer ${sessionStorage.getItem('sentinel.token')}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify({ version: '1.0.0' }),
    });
    return r.status;
  }, MODEL);
  if (status !== 403) throw new Error(`the viewer's deploy call got ${status}, not 403`);

  console.log(`e2e ok: deployment ${deployment} served on ${device}; viewer refused with 403`);
} catch (e) {
  const failShot = shot.replace(/\.png$/, '-failure.png');
  await page.screenshot({ path: failShot, fullPage: true }).catch(() => {});
  console.error(`e2e failed at step "${step}": ${e.message}`);
  if (problems.length) console.error(problems.join('\n'));
  console.error(`screenshot of the failure: ${failShot}`);
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  clearTimeout(watchdog);
}
