// Drives the hub's web interface in headless Chromium (Debian's
// /usr/bin/chromium, through playwright-core). Run by hub/tests/web_e2e.rs:
//
//   node e2e.mjs <hub url> <admin token> <viewer token> <screenshot.png>
//
// As admin: sign in, upload digits_mlp_v1.onnx, deploy it to every device,
// with two policy fields set in the form and shown on the deployment page,
// and watch the deployment reach "serving" on the connected test agent
// without reloading the page; save a screenshot. The audit log filtered by
// outcome, with no change-feed tickets in it; every view fits a 420 px
// window. As viewer: no deploy
// button, and the deploy API answers 403 when called from the page anyway.
// Exits non-zero with a message on the first failed step.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [url, adminToken, viewerToken, shot] = process.argv.slice(2);
if (!shot) {
  console.error('usage: node e2e.mjs <hub url> <admin token> <viewer token> <screenshot.png>');
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

  step = 'upload a version';
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
  await page.locator('#deploy-form [name=target]').fill('*');
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
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);

  step = 'device view';
  const device = await page.locator('#rollout-devices [data-device]').first().getAttribute('data-device');
  await page.goto(`${url}/ui/#/devices/${encodeURIComponent(device)}`);
  await page.waitForSelector('text=Old version against new');
  // Value-axis labels of every plot are distinct (they once read 0.06 four times).
  const repeated = await page.evaluate(() => [...document.querySelectorAll('svg.plot')].filter((svg) => {
    const labels = [...svg.querySelectorAll('text.tick')].map((t) => t.textContent);
    return new Set(labels).size !== labels.length;
  }).length);
  if (repeated) throw new Error(`${repeated} plots repeat a value-axis label`);
  const deviceShot = shot.replace(/\.png$/, '-device.png');
  await page.screenshot({ path: deviceShot, fullPage: true });
  console.log(`screenshot: ${deviceShot}`);

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
  await page.screenshot({ path: auditShot, fullPage: true });
  console.log(`screenshot: ${auditShot}`);

  step = 'a 420 px window';
  await page.setViewportSize({ width: 420, height: 800 });
  for (const view of ['#/models', `#/models/${MODEL}`, '#/deployments', '#/devices']) {
    await page.goto(`${url}/ui/${view}`);
    await page.waitForSelector('main .card:visible');
    const wide = await page.evaluate(() => document.documentElement.scrollWidth);
    if (wide > 420) throw new Error(`${view} is ${wide} px wide in a 420 px window`);
  }
  const narrowShot = shot.replace(/\.png$/, '-narrow.png');
  await page.screenshot({ path: narrowShot, fullPage: true });
  console.log(`screenshot: ${narrowShot}`);
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
