// Sentinel hub web interface: plain JavaScript, no libraries, nothing
// loaded from elsewhere. Every call goes to this hub's /api/v1 with the
// token the person signed in with; the API decides what each role may do,
// the page only hides what would be refused anyway.
'use strict';

const TOKEN_KEY = 'sentinel.token';
const STATES = ['pending', 'downloading', 'validating', 'canary', 'serving', 'rolled_back', 'failed'];
const $ = (sel) => document.querySelector(sel);

let me = null;          // {name, role} from /api/v1/whoami
let liveRefresh = null; // what the current view re-fetches on a change event
let stream = null;      // the open EventSource
let backoff = 1000;

// ---------- small helpers ----------

/** Builds an element; strings become text nodes (never HTML). */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    // Through the CSSOM: the CSP refuses style attributes.
    else if (k === 'style') for (const decl of v.split(';')) { const [p, val] = decl.split(':'); if (val) el.style.setProperty(p.trim(), val.trim()); }
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';
function s(tag, attrs, ...kids) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function fmtTime(ms) { return ms ? new Date(ms).toLocaleString() : '—'; }
function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}
function badge(text, cls) { return h('span', { class: `badge ${cls || text}`, 'data-state': text }, text.replace('_', ' ')); }
/** An empty list's message, and the exact command that fills it. */
function emptyState(text, command) {
  return h('div', { class: 'empty' }, h('p', {}, text), h('pre', {}, h('code', {}, command)));
}

function timeCell(ms) { return h('span', { title: fmtTime(ms) }, ago(ms)); }
function can(role) {
  if (!me) return false;
  return me.role === 'admin' || me.role === role;
}
let flashAt = 0;
function flash(msg, bad) {
  flashAt = Date.now();
  const f = $('#flash');
  f.textContent = msg;
  f.className = bad ? 'bad' : '';
  if (!bad) setTimeout(() => { if (f.textContent === msg) f.textContent = ''; }, 6000);
}
const COLORS = { pending: '#9aa5b1', downloading: '#4f86e0', validating: '#8e6bd8', canary: '#e8a23a',
  serving: '#2e9d5b', rolled_back: '#d9534f', failed: '#7d1d1d' };
function stateColor(st) { return COLORS[st] || '#9aa5b1'; }

/** Splits an agent event reason into text and the metrics snapshot after ` | `. */
function splitReason(reason) {
  const i = (reason || '').indexOf(' | {');
  if (i < 0) return { text: reason || '', metrics: null };
  try { return { text: reason.slice(0, i), metrics: JSON.parse(reason.slice(i + 3)) }; }
  catch { return { text: reason, metrics: null }; }
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, contentType) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ''}` };
  const init = { method, headers };
  if (body !== undefined) {
    if (contentType) { headers['Content-Type'] = contentType; init.body = body; }
    else { headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
  }
  const r = await fetch(`/api/v1${path}`, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || `${r.status} ${r.statusText}`;
    if (r.status === 401) { signOut(msg); }
    throw new ApiError(r.status, msg);
  }
  return data;
}

// ---------- sign in, live stream ----------

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    me = await api('GET', '/whoami');
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    throw e;
  }
  $('#signin').hidden = true;
  $('#nav').hidden = false;
  $('#who').hidden = false;
  $('#who-name').textContent = me.name;
  $('#who-role').textContent = me.role;
  $('#nav-audit').hidden = me.role !== 'admin';
  connectLive();
  route();
}

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  if (stream) { stream.close(); stream = null; }
  $('#nav').hidden = true;
  $('#who').hidden = true;
  $('#view').replaceChildren();
  $('#signin').hidden = false;
  $('#signin-error').textContent = why || '';
  setLive(false, 'offline');
}

function setLive(on, text) {
  const l = $('#live');
  l.className = `live ${on ? 'on' : 'off'}`;
  l.textContent = text;
}

let refreshTimer = null;
function scheduleRefresh() {
  if (!liveRefresh || refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (liveRefresh) liveRefresh().catch((e) => flash(e.message, true));
  }, 250);
}

/** Opens the event stream with a one-time ticket; reopens with backoff. */
async function connectLive() {
  if (!me) return;
  if (stream) { stream.close(); stream = null; }
  let ticket;
  try {
    ticket = (await api('POST', '/events/ticket')).ticket;
  } catch {
    setLive(false, 'offline');
    setTimeout(connectLive, backoff);
    backoff = Math.min(backoff * 2, 30000);
    return;
  }
  const es = new EventSource(`/api/v1/events/stream?ticket=${encodeURIComponent(ticket)}`);
  stream = es;
  es.addEventListener('hello', () => { backoff = 1000; setLive(true, 'live'); });
  es.addEventListener('change', scheduleRefresh);
  es.addEventListener('heartbeat', () => setLive(true, 'live'));
  es.addEventListener('expired', () => { es.close(); signOut('Your token was revoked.'); });
  es.onerror = () => {
    // A ticket works once, so the browser's own reconnect cannot succeed.
    es.close();
    if (stream !== es) return;
    stream = null;
    setLive(false, 'reconnecting');
    setTimeout(connectLive, backoff);
    backoff = Math.min(backoff * 2, 30000);
  };
}

// ---------- routing ----------

async function route() {
  if (!me) return;
  liveRefresh = null;
  // A message belongs to the action that led here, not to later pages.
  if (Date.now() - flashAt > 1500) $('#flash').textContent = '';
  const parts = (location.hash.replace(/^#\/?/, '') || 'models').split('/').map(decodeURIComponent);
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('on', a.dataset.view === parts[0]);
  const view = $('#view');
  const views = {
    models: () => (parts[1] ? modelView(parts[1]) : modelsView()),
    deployments: () => (parts[1] ? deploymentView(Number(parts[1])) : deploymentsView()),
    devices: () => (parts[1] ? deviceView(parts[1]) : devicesView()),
    audit: auditView,
  };
  const render = views[parts[0]] || views.models;
  try {
    const { node, refresh } = await render();
    view.replaceChildren(node);
    liveRefresh = refresh || null;
  } catch (e) {
    view.replaceChildren(h('div', { class: 'card' }, h('p', { class: 'error' }, e.message)));
  }
}

/** A card whose body `load` fills, and re-fills on live changes. */
function liveCard(title, load, extra) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const card = h('div', { class: 'card' }, title ? h('h2', {}, title) : null, extra || null, body);
  const refresh = async () => body.replaceChildren(await load());
  return { card, refresh };
}

// ---------- models ----------

async function modelsView() {
  const list = liveCard(null, async () => {
    const { models } = await api('GET', '/models?limit=500');
    if (!models.length) {
      return emptyState('No models yet. Push one, with the version it is:',
        'sentinel model push model.onnx --name NAME --version 1.0.0');
    }
    return h('table', {},
      h('thead', {}, h('tr', {}, ['Model', 'Description', 'Versions', 'Latest', 'Updated'].map((t) => h('th', {}, t)))),
      h('tbody', {}, models.map((m) => h('tr', {},
        h('td', {}, h('a', { href: `#/models/${encodeURIComponent(m.name)}` }, m.name)),
        h('td', {}, m.description),
        h('td', { class: 'num' }, m.version_count),
        h('td', {}, m.latest_version || '—'),
        h('td', {}, timeCell(m.updated_at_ms))))));
  });
  await list.refresh();
  const node = h('div', {},
    h('div', { class: 'row spread' }, h('h1', {}, 'Models')),
    can('publisher') ? uploadForm('') : null,
    list.card);
  return { node };
}

function uploadForm(model) {
  const err = h('p', { class: 'error' });
  const form = h('form', { class: 'inline', id: 'upload-form' },
    h('label', {}, 'Model', h('input', { name: 'model', required: true, value: model, placeholder: 'digits' })),
    h('label', {}, 'Version', h('input', { name: 'version', required: true, placeholder: '1.0.0' })),
    h('label', {}, 'Stage', h('select', { name: 'stage' },
      ['development', 'staging', 'production'].map((st) => h('option', { value: st }, st)))),
    h('label', {}, 'Accuracy', h('input', { name: 'accuracy', type: 'number', step: 'any', min: 0, max: 1, placeholder: '0.97' })),
    h('label', {}, 'Hardware', h('input', { name: 'hardware', placeholder: 'x86_64,aarch64' })),
    h('label', {}, 'ONNX file', h('input', { name: 'file', type: 'file', required: true, accept: '.onnx' })),
    h('button', { type: 'submit', class: 'primary', id: 'upload-submit' }, 'Upload'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    err.textContent = '';
    const f = new FormData(form);
    const name = f.get('model').trim();
    const file = f.get('file');
    const q = new URLSearchParams({ version: f.get('version').trim(), stage: f.get('stage') });
    if (f.get('accuracy')) q.set('accuracy', f.get('accuracy'));
    if (f.get('hardware').trim()) q.set('hardware', f.get('hardware').trim());
    const button = form.querySelector('button');
    button.disabled = true;
    try {
      // Asked by listing, not by a GET that may 404: the console stays clean.
      const { models } = await api('GET', `/models?name=${encodeURIComponent(name)}&limit=500`);
      if (!models.some((x) => x.name === name)) await api('POST', '/models', { name, description: '' });
      const v = await api('POST', `/models/${encodeURIComponent(name)}/versions?${q}`, file, 'application/octet-stream');
      flash(`Uploaded ${v.model} ${v.version} (sha256 ${v.sha256.slice(0, 12)}…).`);
      location.hash = `#/models/${encodeURIComponent(name)}`;
      route();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  return h('div', { class: 'card' }, h('h2', {}, 'Upload a version'), form, err);
}

/** Whether a push of a new version needs a publisher signature, and who requires it. */
function publisherRequirement(m) {
  if (m.require_publisher_source === 'hub') {
    return `Publisher signature: required by the hub (--require-publisher)${m.require_publisher ? ', and by this model' : ', for every model'}`;
  }
  return m.require_publisher_effective ? 'Publisher signature: required by this model' : 'Publisher signature: not required';
}

async function modelView(name) {
  const m = await api('GET', `/models/${encodeURIComponent(name)}`);
  const versions = (await api('GET', `/models/${encodeURIComponent(name)}/versions?limit=500`)).versions
    .sort((a, b) => b.created_at_ms - a.created_at_ms);
  const deployer = can('deployer');
  const active = deployer ? (await api('GET', `/deployments?model=${encodeURIComponent(name)}&state=active&limit=1`)).total : 0;
  // A version the fleet halted is not offered for deployment again here:
  // the halt says why, and the CLI can still deploy it on purpose.
  const halted = new Map(deployer
    ? (await api('GET', `/deployments?model=${encodeURIComponent(name)}&state=halted&limit=500`)).deployments
      .map((d) => [d.version, d])
    : []);
  const deployErr = h('p', { class: 'error' });
  // Where each version runs, and where it was rolled back, from the devices'
  // last reports (the first 500 devices).
  const where = new Map();
  for (const dev of (await api('GET', '/devices?limit=500')).devices) {
    for (const m of dev.models || []) {
      if (m.name !== name) continue;
      const w = where.get(m.version) || { runs: [], rolledBack: [] };
      if (m.state === 'rolled_back') w.rolledBack.push(dev.id);
      else if (['serving', 'canary', 'shadow'].includes(m.state)) w.runs.push(dev.id);
      where.set(m.version, w);
    }
  }
  const whereCell = (version) => {
    const w = where.get(version);
    if (!w || (!w.runs.length && !w.rolledBack.length)) return h('span', { class: 'muted' }, 'nowhere');
    return [
      w.runs.length ? h('div', { 'data-runs': version, title: w.runs.join(', ') }, `runs on ${w.runs.length}`) : null,
      w.rolledBack.length ? h('div', { 'data-rolled-back': version, title: w.rolledBack.join(', ') },
        badge('rolled_back'), ` on ${w.rolledBack.length}`) : null,
    ];
  };
  const rows = versions.map((v) => {
    const acc = v.manifest.accuracy;
    return h('tr', {},
      h('td', {}, h('b', {}, v.version)),
      h('td', {}, badge(v.stage, 'stage')),
      h('td', { class: 'num' }, acc ? `${(acc.value * 100).toFixed(2)} %` : '—', acc ? h('div', { class: 'muted' }, acc.metric) : null),
      h('td', {}, h('code', { title: v.sha256 }, `${v.sha256.slice(0, 16)}…`)),
      h('td', { class: 'num' }, size(v.size)),
      h('td', {}, v.hardware.length ? v.hardware.join(', ') : 'any'),
      h('td', {}, h('code', {}, v.key_id)),
      h('td', {}, timeCell(v.created_at_ms), h('div', { class: 'muted' }, v.created_by)),
      h('td', {}, whereCell(v.version)),
      deployer ? h('td', {}, halted.has(v.version)
        ? h('span', { class: 'badge halted', 'data-halted': v.version,
          title: `deployment ${halted.get(v.version).id} halted: ${halted.get(v.version).halt_reason || ''}` }, 'halted')
        : h('button', {
          type: 'button', class: 'small primary deploy-btn', 'data-version': v.version,
          onclick: () => openDeploy(v.version),
        }, 'Deploy')) : null);
  });
  const deployBox = h('div', {});
  function openDeploy(version) {
    // Every policy field, its default as the placeholder: empty means the default.
    const policyInputs = POLICY_FIELDS.map(([key, label, hint, type]) => h('label', {}, label,
      h('input', { name: `policy.${key}`, type: type || 'number', step: 'any', min: 0, placeholder: hint })));
    const form = h('form', { class: 'inline', id: 'deploy-form' },
      h('label', {}, 'Version', h('input', { name: 'version', value: version, readonly: true })),
      h('label', {}, 'Target selector', h('input', { name: 'target', required: true, placeholder: 'ring=production,site=a, or * for every device' })),
      h('label', {}, 'Halt above fraction', h('input', { name: 'halt', type: 'number', step: 'any', min: 0, max: 1, placeholder: '0.2' })),
      h('label', {}, 'Halt at count', h('input', { name: 'halt_count', type: 'number', min: 1, placeholder: 'none' })),
      h('label', {}, 'Waves (cumulative %)', h('input', { name: 'waves', placeholder: 'all at once; e.g. 10,50,100' })),
      h('details', { id: 'deploy-policy' }, h('summary', {}, 'Rollout policy (empty fields keep the default shown)'),
        h('div', { class: 'policy-grid' }, policyInputs)),
      h('button', { type: 'submit', class: 'primary', id: 'deploy-submit' }, `Deploy ${version}`),
      h('button', { type: 'button', onclick: () => deployBox.replaceChildren() }, 'Cancel'));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      deployErr.textContent = '';
      const f = new FormData(form);
      const body = { version, target: f.get('target').trim() };
      if (f.get('halt')) body.halt_fraction = Number(f.get('halt'));
      if (f.get('halt_count')) body.halt_count = Number(f.get('halt_count'));
      const waves = String(f.get('waves') || '').split(',').map((w) => w.trim()).filter(Boolean);
      if (waves.length) body.waves = waves.map(Number);
      const policy = {};
      for (const [key, , , type] of POLICY_FIELDS) {
        const v = String(f.get(`policy.${key}`) || '').trim();
        if (!v) continue;
        policy[key] = type === 'text' ? v.split(',').map((p) => p.trim()).filter(Boolean) : Number(v);
      }
      if (Object.keys(policy).length) body.policy = policy;
      try {
        const d = await api('POST', `/models/${encodeURIComponent(name)}/deploy`, body);
        const said = (d.warnings || []).map((w) => ` Warning: ${w}`).join('');
        flash(`Deployment ${d.id} created: ${d.model} ${d.version} to [${d.target || 'every device'}].${said}`);
        location.hash = `#/deployments/${d.id}`;
      } catch (e) { deployErr.textContent = e.message; }
    });
    deployBox.replaceChildren(h('div', { class: 'card' }, h('h2', {}, `Deploy ${name} ${version}`), form, deployErr));
  }
  const deps = liveCard('Deployments of this model', () => deploymentTable(`?model=${encodeURIComponent(name)}&limit=50`, true));
  await deps.refresh();
  const node = h('div', {},
    h('div', { class: 'row spread' },
      h('h1', {}, h('a', { href: '#/models' }, 'Models'), ' / ', name),
      active ? h('button', { type: 'button', class: 'danger', id: 'rollback-btn', onclick: () => rollback(name) }, 'Roll back') : null),
    m.description ? h('p', { class: 'muted' }, m.description) : null,
    h('p', { class: 'muted', id: 'publisher-requirement' }, publisherRequirement(m)),
    h('div', { class: 'card' }, h('h2', {}, 'Versions'),
      versions.length ? h('table', {},
        h('thead', {}, h('tr', {}, ['Version', 'Stage', 'Accuracy', 'SHA-256', 'Size', 'Hardware', 'Signing key', 'Created', 'Where', deployer ? '' : null]
          .filter((t) => t !== null).map((t) => h('th', {}, t)))),
        h('tbody', {}, rows))
        : emptyState('No versions yet. Push one:', `sentinel model push model.onnx --name ${name} --version 1.0.0`)),
    deployBox,
    can('publisher') ? uploadForm(name) : null,
    deps.card);
  return { node, refresh: deps.refresh };
}

/** The rollout policy's fields: API name, label, default (as the hub fills it), input type. */
const POLICY_FIELDS = [
  ['phases', 'Phases', 'full; e.g. shadow,canary:10,full', 'text'],
  ['bake_seconds', 'Bake per phase (s)', '30 with phases, else 0'],
  ['min_samples', 'Samples per phase', '100 with phases, else 200'],
  ['max_latency_ratio', 'Max p95 ratio to old', '1.5 (shadow/canary only)'],
  ['latency_slo_ms', 'p95 SLO (ms)', 'none'],
  ['max_error_rate', 'Max error rate', '0.05'],
  ['min_accuracy', 'Min accuracy', 'declared - 0.02'],
  ['max_accuracy_drop', 'Max accuracy drop', 'none (shadow/canary only)'],
  ['min_shadow_agreement', 'Min shadow agreement', 'none (shadow only)'],
  ['min_accuracy_samples', 'Accuracy samples', '50'],
  ['standby_bake_seconds', 'Standby kept warm (s)', '60'],
  ['max_restarts', 'Max worker restarts', '3'],
];

/** A policy as `key value; ...`, in the fields' order. */
function policyText(p) {
  if (!p) return '';
  return POLICY_FIELDS.filter(([k]) => p[k] !== undefined && p[k] !== null && !(Array.isArray(p[k]) && !p[k].length))
    .map(([k]) => `${k} ${Array.isArray(p[k]) ? p[k].join(',') : p[k]}`).join('; ');
}

async function rollback(name, target) {
  const body = target !== undefined ? { target } : {};
  if (!confirm(`Roll ${name} back to its previous version${target ? ` on [${target}]` : ''}?`)) return;
  try {
    const d = await api('POST', `/models/${encodeURIComponent(name)}/rollback`, body);
    flash(`Rolled ${name} back to ${d.version} (deployment ${d.id}).`);
    location.hash = `#/deployments/${d.id}`;
  } catch (e) { flash(e.message, true); }
}

// ---------- deployments ----------

function countsBar(status) {
  const total = status.targeted || 0;
  return h('div', { class: 'bar', title: STATES.map((st) => `${st}: ${status.counts[st] || 0}`).join(', ') },
    total ? STATES.filter((st) => status.counts[st]).map((st) =>
      h('span', { style: `width:${(100 * status.counts[st]) / total}%;background:${stateColor(st)}` })) : null);
}

/** Deployments with a status bar for the first rows (one request each). */
async function deploymentTable(query, compact) {
  const { deployments } = await api('GET', `/deployments${query}`);
  if (!deployments.length) {
    return emptyState('No deployments yet. Deploy a version to the devices a selector matches:',
      "sentinel model deploy NAME VERSION --target 'site=a'   # or --target '*' for every device");
  }
  const detailed = await Promise.all(deployments.slice(0, 15).map((d) => api('GET', `/deployments/${d.id}`).catch(() => d)));
  return h('table', {},
    h('thead', {}, h('tr', {}, ['#', compact ? null : 'Model', 'Version', 'Target', 'State', 'Devices', 'By', 'Created']
      .filter((t) => t !== null).map((t) => h('th', {}, t)))),
    h('tbody', {}, deployments.map((d, i) => {
      const st = detailed[i] && detailed[i].status;
      return h('tr', { 'data-deployment': d.id },
        h('td', {}, h('a', { href: `#/deployments/${d.id}` }, `#${d.id}`)),
        compact ? null : h('td', {}, h('a', { href: `#/models/${encodeURIComponent(d.model)}` }, d.model)),
        h('td', {}, d.version, d.kind === 'rollback' ? h('div', { class: 'muted' }, 'rollback') : null),
        h('td', {}, d.target ? h('code', {}, d.target) : h('span', { class: 'muted' }, 'every device')),
        h('td', {}, badge(d.state)),
        h('td', {}, st ? [countsBar(st), h('div', { class: 'muted' },
          `${st.counts.serving || 0}/${st.targeted} serving`)] : ''),
        h('td', {}, d.created_by),
        h('td', {}, timeCell(d.created_at_ms)));
    })));
}

async function deploymentsView() {
  const list = liveCard(null, () => deploymentTable('?limit=100', false));
  await list.refresh();
  return { node: h('div', {}, h('h1', {}, 'Deployments'), list.card), refresh: list.refresh };
}

async function deploymentView(id) {
  const content = h('div', {});
  const load = async () => {
    const d = await api('GET', `/deployments/${id}`);
    const st = d.status;
    // Events of the targeted devices rebuild each device's path over time.
    const devices = await Promise.all(st.devices.slice(0, 50).map((r) =>
      api('GET', `/devices/${encodeURIComponent(r.device)}`).catch(() => null)));
    const chips = h('div', { class: 'chips', id: 'counts' },
      h('div', { class: 'chip' }, h('span', { class: 'muted' }, 'targeted'), h('b', {}, st.targeted)),
      STATES.map((s2) => h('div', { class: 'chip', 'data-count': s2 },
        h('span', { class: 'muted' }, h('i', { style: `background:${stateColor(s2)}` }), s2.replace('_', ' ')),
        h('b', {}, st.counts[s2] || 0))));
    const canRollback = can('deployer') && d.state === 'active';
    content.replaceChildren(
      h('div', { class: 'row spread' },
        h('h1', {}, h('a', { href: '#/deployments' }, 'Deployments'), ` / #${d.id} `, badge(d.state)),
        canRollback ? h('button', { type: 'button', class: 'danger', onclick: () => rollback(d.model, d.target || '*') }, 'Roll back') : null),
      h('div', { class: 'card' },
        h('dl', { class: 'facts' },
          h('dt', {}, 'Model'), h('dd', {}, h('a', { href: `#/models/${encodeURIComponent(d.model)}` }, d.model), ` ${d.version}`),
          h('dt', {}, 'Target'), h('dd', {}, d.target ? h('code', {}, d.target) : 'every device'),
          h('dt', {}, 'Kind'), h('dd', {}, d.kind, d.replaces ? [' (replaces ', h('a', { href: `#/deployments/${d.replaces}` }, `#${d.replaces}`), ')'] : ''),
          h('dt', {}, 'Created'), h('dd', {}, `${fmtTime(d.created_at_ms)} by ${d.created_by}`),
          h('dt', {}, 'Halts'), h('dd', {}, `above ${Math.round(d.halt_fraction * 100)} % of devices rolled back or failed`,
            d.halt_count ? `, or at ${d.halt_count}` : ''),
          h('dt', {}, 'Policy'), h('dd', { id: 'policy' }, d.policy ? policyText(d.policy) : 'the defaults',
            d.effective_policy ? h('div', { class: 'muted', id: 'effective-policy' }, `in effect: ${policyText(d.effective_policy)}`) : null),
          (d.waves || []).length ? [h('dt', {}, 'Waves'), h('dd', { id: 'waves' },
            d.waves.map((p, i) => (i === d.wave ? h('b', {}, `${p} %`) : `${p} %`)).flatMap((x, i) => (i ? [' → ', x] : [x])),
            st.waiting ? ` (${st.waiting} devices waiting for a later wave)` : '')] : null),
        d.halt_reason ? h('div', { class: 'alert', id: 'halt-reason' }, h('b', {}, 'Halted: '), d.halt_reason) : null,
        chips, countsBar(st)),
      h('div', { class: 'card' }, h('h2', {}, 'States over time'), timelinePlot(d, devices.filter(Boolean))),
      h('div', { class: 'card' }, h('h2', {}, 'Devices'),
        st.devices.length ? h('table', { id: 'rollout-devices' },
          h('thead', {}, h('tr', {}, ['Device', 'State', 'Version', 'Detail', 'Updated'].map((t) => h('th', {}, t)))),
          h('tbody', {}, st.devices.map((r) => h('tr', { 'data-device': r.device },
            h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(r.device)}` }, r.device)),
            h('td', {}, badge(r.state)),
            h('td', {}, r.version || '—'),
            h('td', { class: 'reason' }, splitReason(r.detail).text),
            h('td', {}, timeCell(r.updated_ms))))))
          : emptyState('No enrolled device matches this target. Enrol one with matching labels, then start its agent with the printed token:',
            'sentinel device enroll DEVICE_ID --labels site=a')));
  };
  await load();
  return { node: content, refresh: load };
}

/** Maps an agent event to the deployment state it starts, or null. */
function eventState(e) {
  switch (e.kind) {
    case 'download_started': case 'download_resumed': return 'downloading';
    case 'model_installed':
      if (/now serving/.test(e.reason || '')) return 'serving';
      return /rollout started|canary|shadow/.test(e.reason || '') ? 'canary' : 'validating';
    case 'rollout_complete': return 'serving';
    case 'rolled_back': return 'rolled_back';
    case 'rollout_phase': {
      const m = /\((\w+)\)/.exec(e.reason || '');
      if (!m) return null;
      return m[1] === 'serving' ? 'serving' : 'canary';
    }
    default: return /failed|refused/.test(e.kind) ? 'failed' : null;
  }
}

/** Stacked step chart: devices per state from creation until now. */
function timelinePlot(d, devices) {
  const start = d.created_at_ms;
  const end = Math.max(Date.now(), start + 1000);
  const byDevice = new Map(d.status.devices.map((r) => [r.device, [{ t: start, st: 'pending' }]]));
  for (const dev of devices) {
    const path = byDevice.get(dev.id);
    if (!path) continue;
    const evs = (dev.events || []).filter((e) => e.model === d.model && e.version === d.version && e.at_ms >= start)
      .sort((a, b) => a.at_ms - b.at_ms);
    for (const e of evs) { const st = eventState(e); if (st) path.push({ t: e.at_ms, st }); }
  }
  // The report is the authority on where each device stands now.
  for (const r of d.status.devices) {
    const path = byDevice.get(r.device);
    const last = path[path.length - 1];
    if (last.st !== r.state) path.push({ t: Math.max(r.updated_ms || end, last.t), st: r.state });
  }
  const times = [...new Set([...byDevice.values()].flat().map((p) => p.t))].sort((a, b) => a - b);
  const samples = times.map((t) => {
    const c = Object.fromEntries(STATES.map((st) => [st, 0]));
    for (const path of byDevice.values()) {
      let cur = null;
      for (const p of path) if (p.t <= t) cur = p.st;
      if (cur) c[cur] += 1;
    }
    return { t, c };
  });
  const total = Math.max(1, d.status.targeted);
  const W = 900, H = 220, L = 40, R = 12, T = 10, B = 28;
  const x = (t) => L + ((t - start) / (end - start)) * (W - L - R);
  const y = (v) => T + (1 - v / total) * (H - T - B);
  const svg = s('svg', { class: 'plot', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Devices per state over time' });
  for (let v = 0; v <= total; v += Math.max(1, Math.ceil(total / 4))) {
    svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, v));
  }
  if (!d.status.targeted) {
    svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no targeted devices'));
  }
  // Each state is a band between the cumulative counts below and above it.
  let below = samples.map(() => 0);
  for (const st of STATES) {
    const above = samples.map((p, i) => below[i] + p.c[st]);
    if (above.some((v, i) => v !== below[i])) {
      let top = '', bottom = '';
      samples.forEach((p, i) => {
        const x0 = x(p.t), x1 = x(i + 1 < samples.length ? samples[i + 1].t : end);
        top += `${i ? 'L' : 'M'}${x0},${y(above[i])}L${x1},${y(above[i])}`;
        bottom = `L${x1},${y(below[i])}L${x0},${y(below[i])}` + bottom;
      });
      svg.append(s('path', { d: `${top}${bottom}Z`, fill: stateColor(st), opacity: 0.88 },
        s('title', {}, st)));
    }
    below = above;
  }
  svg.append(s('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }),
    s('text', { x: L, y: H - 8 }, new Date(start).toLocaleTimeString()),
    s('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, `now (${new Date(end).toLocaleTimeString()})`));
  return h('div', {}, svg, h('div', { class: 'legend' },
    STATES.map((st) => h('span', {}, h('i', { style: `background:${stateColor(st)}` }), st.replace('_', ' ')))));
}

// ---------- devices ----------

function runs(models) {
  if (!models || !models.length) return h('span', { class: 'muted' }, 'nothing');
  return models.map((m) => h('div', {}, `${m.name} ${m.version} `, badge(m.state)));
}

async function devicesView() {
  const list = liveCard(null, async () => {
    const { devices, total } = await api('GET', '/devices?limit=500');
    if (!devices.length) {
      return emptyState('No devices enrolled. Enrol one; the command prints its token and a config for sentinel-agent:',
        'sentinel device enroll edge-1 --labels site=a');
    }
    return h('div', {}, total > devices.length ? h('p', { class: 'muted' }, `The first ${devices.length} of ${total} devices.`) : null,
      h('table', {},
      h('thead', {}, h('tr', {}, ['Device', 'Connection', 'Last seen', 'Runs', 'Labels', 'Hardware', 'Agent'].map((t) => h('th', {}, t)))),
      h('tbody', {}, devices.map((d) => h('tr', {},
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
        h('td', {}, h('span', { class: `dot ${d.connected ? 'on' : ''}` }), d.connected ? 'connected' : 'offline'),
        h('td', {}, d.connected ? 'now' : timeCell(d.last_seen_ms)),
        h('td', {}, runs(d.models)),
        h('td', {}, Object.entries(d.labels).map(([k, v]) => h('div', {}, h('code', {}, `${k}=${v}`)))),
        h('td', {}, d.hardware.join(', ')),
        h('td', {}, d.agent_version))))));
  });
  await list.refresh();
  return { node: h('div', {}, h('h1', {}, 'Devices'), list.card), refresh: list.refresh };
}

/** Line chart of `series` [{name, color, points: [{t, v}]}]. */
/**
 * Round ticks covering [lo, hi]: a 1, 2 or 5 step, and as many decimals as
 * keep neighbouring labels apart once `scale` applies (100 for percents).
 */
function niceTicks(lo, hi, count, scale) {
  const raw = (hi - lo) / count || Math.abs(hi) || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw * (1 - 1e-9));
  const start = Math.floor(lo / step) * step, end = Math.ceil(hi / step) * step;
  const n = Math.max(1, Math.round((end - start) / step));
  const decimals = Math.max(0, -Math.floor(Math.log10(step * scale) + 1e-9));
  return { ticks: Array.from({ length: n + 1 }, (_, i) => start + i * step), lo: start, hi: start + n * step, decimals };
}

/** A line plot of `series`; `axis` = { scale, suffix } labels the value axis with units. */
function linePlot(series, unit, fmt, axis) {
  const pts = series.flatMap((se) => se.points).filter((p) => p.v !== null && p.v !== undefined);
  if (!pts.length) return h('p', { class: 'empty' }, 'No reports with this metric yet.');
  const W = 560, H = 200, L = 70, R = 12, T = 10, B = 28;
  let t0 = Math.min(...pts.map((p) => p.t)), t1 = Math.max(...pts.map((p) => p.t));
  if (t1 === t0) { t0 -= 1000; t1 += 1000; }
  let v0 = Math.min(...pts.map((p) => p.v)), v1 = Math.max(...pts.map((p) => p.v));
  const pad = (v1 - v0) * 0.1 || Math.abs(v1) * 0.1 || 1;
  const nt = niceTicks(Math.max(0, v0 - pad), v1 + pad, 4, axis.scale);
  v0 = nt.lo; v1 = nt.hi;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - v0) / (v1 - v0)) * (H - T - B);
  const svg = s('svg', { class: 'plot', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': unit });
  for (const v of nt.ticks) {
    svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      s('text', { class: 'tick', x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, `${(v * axis.scale).toFixed(nt.decimals)}${axis.suffix}`));
  }
  for (const se of series) {
    const p = se.points.filter((q) => q.v !== null && q.v !== undefined);
    if (!p.length) continue;
    svg.append(s('polyline', { points: p.map((q) => `${x(q.t)},${y(q.v)}`).join(' '), fill: 'none',
      stroke: se.color, 'stroke-width': 2 }));
    for (const q of p) {
      svg.append(s('circle', { cx: x(q.t), cy: y(q.v), r: 4, fill: se.color },
        s('title', {}, `${se.name}: ${fmt(q.v)} ${unit} at ${fmtTime(q.t)}${q.label ? ` (${q.label})` : ''}`)));
    }
  }
  svg.append(s('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }),
    s('text', { x: L, y: H - 8 }, new Date(t0).toLocaleTimeString()),
    s('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, new Date(t1).toLocaleTimeString()));
  return h('div', {}, svg, h('div', { class: 'legend' },
    series.map((se) => h('span', {}, h('i', { style: `background:${se.color}` }), se.name))));
}

/** Latency and accuracy of the new version (green) against the old (blue). */
function metricsPlots(events) {
  const snaps = events.map((e) => ({ e, m: splitReason(e.reason).metrics }))
    .filter((x) => x.m && x.m.green).sort((a, b) => a.e.at_ms - b.e.at_ms);
  const series = (key) => [
    { name: 'new version', color: '#2e9d5b', points: snaps.map(({ e, m }) => ({ t: e.at_ms, v: m.green[key], label: `${e.model} ${e.version}, ${e.kind}` })) },
    { name: 'old version', color: '#4f86e0', points: snaps.map(({ e, m }) => ({ t: e.at_ms, v: m.blue ? m.blue[key] : null, label: e.kind })) },
  ];
  const acc = (key) => series(key);
  const accKey = snaps.some(({ m }) => m.green.feedback_accuracy !== null && m.green.feedback_accuracy !== undefined)
    ? 'feedback_accuracy' : 'validation_accuracy';
  return h('div', { class: 'grid2' },
    h('div', {}, h('h3', {}, 'p95 latency (ms)'), linePlot(series('p95_ms'), 'ms', (v) => v.toFixed(2), { scale: 1, suffix: ' ms' })),
    h('div', {}, h('h3', {}, accKey === 'feedback_accuracy' ? 'Accuracy (feedback)' : 'Accuracy (validation)'),
      linePlot(acc(accKey), '', (v) => `${(v * 100).toFixed(1)}%`, { scale: 100, suffix: '%' })));
}

async function deviceView(id) {
  const content = h('div', {});
  const load = async () => {
    const d = await api('GET', `/devices/${encodeURIComponent(id)}`);
    content.replaceChildren(
      h('h1', {}, h('a', { href: '#/devices' }, 'Devices'), ` / ${d.id} `,
        d.connected ? badge('connected') : badge('offline', 'pending')),
      h('div', { class: 'grid2' },
        h('div', { class: 'card' }, h('h2', {}, 'Device'),
          h('dl', { class: 'facts' },
            h('dt', {}, 'Last seen'), h('dd', {}, d.connected ? `connected since ${fmtTime(d.connected_since_ms)}` : fmtTime(d.last_seen_ms)),
            h('dt', {}, 'Labels'), h('dd', {}, Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(', ') || '—'),
            h('dt', {}, 'Hardware'), h('dd', {}, d.hardware.join(', ') || '—'),
            h('dt', {}, 'Agent'), h('dd', {}, d.agent_version || '—'),
            h('dt', {}, 'Revision'), h('dd', {}, d.applied_revision ?? '—'),
            h('dt', {}, 'Enrolled'), h('dd', {}, fmtTime(d.created_at_ms)))),
        h('div', { class: 'card' }, h('h2', {}, 'Runs'),
          h('table', {}, h('thead', {}, h('tr', {}, ['Model', 'Version', 'State', 'Detail'].map((t) => h('th', {}, t)))),
            h('tbody', {}, (d.models || []).map((m) => h('tr', {},
              h('td', {}, m.name), h('td', {}, m.version), h('td', {}, badge(m.state)),
              h('td', { class: 'reason' }, splitReason(m.detail).text))))),
          h('h3', {}, 'Should run'),
          (d.desired || []).length ? h('ul', {}, d.desired.map((x) => h('li', {}, `${x.model} ${x.version} `,
            h('a', { href: `#/deployments/${x.deployment_id}` }, `(deployment #${x.deployment_id})`))))
            : h('p', { class: 'muted' }, 'nothing'))),
      h('div', { class: 'card' }, h('h2', {}, 'Old version against new, from reports'), metricsPlots(d.events || [])),
      h('div', { class: 'card' }, h('h2', {}, 'Events'),
        (d.events || []).length ? h('table', {},
          h('thead', {}, h('tr', {}, ['When', 'Event', 'Model', 'Reason'].map((t) => h('th', {}, t)))),
          h('tbody', {}, d.events.map((e) => h('tr', {},
            h('td', {}, timeCell(e.at_ms)), h('td', {}, e.kind), h('td', {}, e.model ? `${e.model} ${e.version}` : ''),
            h('td', { class: 'reason' }, splitReason(e.reason).text)))))
          : h('p', { class: 'empty' }, 'No events reported.')));
  };
  await load();
  return { node: content, refresh: load };
}

// ---------- audit ----------

async function auditView() {
  // Filters by who, what and how it ended; a failed or denied row's detail
  // is the refusal the caller got.
  const filter = { actor: '', action: '', outcome: '' };
  const body = h('div', {});
  const load = async () => {
    const q = new URLSearchParams({ limit: '200' });
    for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
    const { entries } = await api('GET', `/audit?${q}`);
    const filtered = Object.values(filter).some(Boolean);
    body.replaceChildren(entries.length ? h('table', { id: 'audit-table' },
      h('thead', {}, h('tr', {}, ['When', 'Who', 'Role', 'Action', 'Status', 'Outcome', 'Detail'].map((t) => h('th', {}, t)))),
      h('tbody', {}, entries.map((e) => h('tr', {},
        h('td', {}, timeCell(e.at_ms)), h('td', {}, e.actor), h('td', {}, e.role), h('td', {}, h('code', {}, e.action)),
        h('td', { class: 'num' }, e.status), h('td', {}, badge(e.outcome)), h('td', { class: 'reason' }, e.detail)))))
      : h('p', { class: 'empty' }, filtered ? 'No entry matches these filters.' : 'The audit log is empty.'));
  };
  const text = (key, label) => h('input', {
    type: 'text', id: `audit-${key}`, placeholder: label, 'aria-label': label,
    onchange: (ev) => { filter[key] = ev.target.value.trim(); load(); },
  });
  const outcome = h('select', {
    id: 'audit-outcome', 'aria-label': 'Outcome',
    onchange: (ev) => { filter.outcome = ev.target.value; load(); },
  }, ['', 'ok', 'denied', 'failed'].map((o) => h('option', { value: o }, o || 'any outcome')));
  await load();
  return {
    node: h('div', {}, h('h1', {}, 'Audit log'),
      h('div', { class: 'filters' }, text('actor', 'Who (token name)'), text('action', 'Action contains'), outcome),
      h('div', { class: 'card' }, body)),
    refresh: load,
  };
}

// ---------- start ----------

document.addEventListener('DOMContentLoaded', () => {
  $('#signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('#signin-error').textContent = '';
    try {
      await signIn($('#token').value.trim());
      $('#token').value = '';
    } catch (e) {
      $('#signin-error').textContent = e.message;
    }
  });
  $('#sign-out').addEventListener('click', () => signOut(''));
  window.addEventListener('hashchange', route);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved).catch((e) => signOut(e.message));
  else signOut('');
});
