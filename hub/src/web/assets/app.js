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
  let telemetry = null; // made once: its range picker keeps its choice across refreshes
  const load = async () => {
    const d = await api('GET', `/deployments/${id}`);
    const st = d.status;
    if (!telemetry) telemetry = deploymentTelemetry(d);
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
      telemetry.card,
      h('div', { class: 'card' }, h('h2', {}, 'Devices'),
        st.devices.length ? h('table', { id: 'rollout-devices', class: 'stack' },
          h('thead', {}, h('tr', {}, ['Device', 'State', 'Version', 'Detail', 'Updated'].map((t) => h('th', {}, t)))),
          h('tbody', {}, st.devices.map((r) => h('tr', { 'data-device': r.device },
            h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(r.device)}` }, r.device)),
            h('td', {}, badge(r.state)),
            h('td', {}, r.version || '—'),
            h('td', { class: 'reason' }, r.detail),
            h('td', {}, timeCell(r.updated_ms))))))
          : emptyState('No enrolled device matches this target. Enrol one with matching labels, then start its agent with the printed token:',
            'sentinel device enroll DEVICE_ID --labels site=a')));
    await telemetry.refresh();
  };
  await load();
  return { node: content, refresh: load };
}

// ---------- telemetry over time ----------
//
// The hub keeps what devices report as buckets per model and version
// (GET /devices/{id}/telemetry, /deployments/{id}/telemetry). Each point is
// one bucket; a value the hub could not compute (no requests, no feedback)
// is null and drawn as a gap, never as zero.

const SECOND = 1000, MINUTE = 60 * SECOND, HOUR = 60 * MINUTE, DAY = 24 * HOUR;
/** One colour per version: the new one first (orange), the versions it replaces after (blue, ...). */
const VERSION_COLORS = ['#d9730d', '#2f6fd6', '#7b52c9', '#1b9aaa', '#8a6d3b', '#6b7280'];
/** The range picker: key, label, span (null: the API's default). */
const RANGES = [['15m', 'Last 15 min', 15 * MINUTE], ['1h', 'Last hour', HOUR], ['6h', 'Last 6 h', 6 * HOUR],
  ['24h', 'Last 24 h', DAY], ['7d', 'Last 7 days', 7 * DAY]];
const NO_TELEMETRY = 'No telemetry yet: devices report every heartbeat (15 s by default).';

function pad2(n) { return String(n).padStart(2, '0'); }
function clock(ms, seconds) {
  const d = new Date(ms);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}${seconds ? `:${pad2(d.getSeconds())}` : ''}`;
}
function dayOf(ms) { return new Date(ms).toLocaleDateString(undefined, { month: 'short', day: 'numeric' }); }
/** A span of time in its largest whole unit: "5 s", "1 min", "1 h". */
function span(ms) {
  if (ms < MINUTE) return `${Math.round(ms / SECOND)} s`;
  if (ms < HOUR) return `${Math.round(ms / MINUTE)} min`;
  if (ms < DAY) return `${Math.round(ms / HOUR)} h`;
  return `${Math.round(ms / DAY)} d`;
}
/** Milliseconds with the digits that matter at their size. */
function fmtMs(v) {
  if (v === null || v === undefined) return '—';
  return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v >= 0.1 ? v.toFixed(2) : v.toFixed(3)} ms`;
}
function pct(v, digits = 1) { return v === null || v === undefined ? '—' : `${(v * 100).toFixed(digits)}%`; }
function fmtCount(n) { return Number(n || 0).toLocaleString('en-US'); }
/** A short duration: "850 ms", "12.5 s", "3 min". */
function took(ms) {
  if (ms < SECOND) return `${Math.round(ms)} ms`;
  if (ms < MINUTE) return `${(ms / SECOND).toFixed(1)} s`;
  return span(ms);
}

/**
 * Round ticks covering [lo, hi]: a 1, 2 or 5 step no finer than `minStep`,
 * and as many decimals as keep neighbouring labels apart once `scale`
 * applies (100 for percents).
 */
function niceTicks(lo, hi, count, scale, minStep = 0) {
  const raw = (hi - lo) / count || Math.abs(hi) || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(minStep, [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw * (1 - 1e-9)));
  const start = Math.floor(lo / step + 1e-9) * step, end = Math.ceil(hi / step - 1e-9) * step;
  const n = Math.max(1, Math.round((end - start) / step));
  const decimals = Math.max(0, -Math.floor(Math.log10(step * scale) + 1e-9));
  return { ticks: Array.from({ length: n + 1 }, (_, i) => start + i * step), lo: start, hi: start + n * step, decimals };
}

const TIME_STEPS = [
  ...[1, 2, 5, 10, 15, 30].map((n) => n * SECOND), ...[1, 2, 5, 10, 15, 30].map((n) => n * MINUTE),
  ...[1, 2, 3, 6, 12].map((n) => n * HOUR), ...[1, 2, 7].map((n) => n * DAY)];

/**
 * Clock-time ticks over [t0, t1]: the finest step giving at most `max`
 * ticks, on round local times. Labels are distinct: seconds when the step
 * is under a minute, and the date on the first tick of each day when the
 * range spans more than one.
 */
function timeTicks(t0, t1, max) {
  const step = TIME_STEPS.find((st) => (t1 - t0) / st <= max) || TIME_STEPS[TIME_STEPS.length - 1];
  const local = (t) => t - new Date(t).getTimezoneOffset() * MINUTE;
  const days = dayOf(t0) !== dayOf(t1);
  const out = [];
  let lastDay = null;
  for (let t = Math.ceil(local(t0) / step) * step - (local(t0) - t0); t <= t1; t += step) {
    const day = dayOf(t);
    let label = step >= DAY ? day : clock(t, step < MINUTE);
    if (days && step < DAY && day !== lastDay) label = `${day} ${label}`;
    lastDay = day;
    out.push({ t, label });
  }
  return out;
}

/**
 * Plot geometry, about as wide as the plot is shown (a card's width, or
 * half of it where .grid2 puts two plots in a row), so its text is drawn at
 * its own size rather than scaled down in a narrow window.
 */
function plotBox() {
  const content = Math.min(window.innerWidth, 1240) - (window.innerWidth > 700 ? 80 : 45);
  const W = Math.round(Math.max(300, content >= 2 * 420 + 16 ? (content - 16) / 2 : content));
  return { W, H: 210, L: 62, R: 16, T: 10, B: 34 };
}

/**
 * An empty plot over time: value grid with `nt`'s ticks labelled in
 * `axis` units ({scale, suffix}), clock-time ticks under it, and the x and
 * y scales for what is drawn in it.
 */
function plotFrame(label, t0, t1, nt, axis) {
  const { W, H, L, R, T, B } = plotBox();
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - nt.lo) / (nt.hi - nt.lo)) * (H - T - B);
  const svg = s('svg', { class: 'plot', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label });
  for (const v of nt.ticks) {
    svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      s('text', { class: 'tick y', x: L - 6, y: y(v) + 4, 'text-anchor': 'end' },
        `${(v * axis.scale).toFixed(nt.decimals)}${axis.suffix}`));
  }
  svg.append(s('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  for (const { t, label: text } of timeTicks(t0, t1, Math.max(2, Math.floor((W - L - R) / 95)))) {
    const at = x(t);
    const anchor = at > W - R - 30 ? 'end' : 'middle';
    svg.append(s('line', { class: 'axis', x1: at, x2: at, y1: H - B, y2: H - B + 4 }),
      s('text', { class: 'tick x', x: at, y: H - B + 16, 'text-anchor': anchor }, text));
  }
  svg.append(s('text', { class: 'axis-label', x: W - R, y: H - 2, 'text-anchor': 'end' }, 'local time'));
  return { svg, x, y };
}

/**
 * A line plot over [opts.t0, opts.t1] of `series`: [{version, name, color,
 * dash, points: [{t, v, title}]}]. A null value, or a step over `opts.gap`
 * ms between points, breaks the line. `opts`: {label, scale, suffix, max
 * (top of the value axis at most), empty (what to say with no values)}.
 * Each point has a title with its value and version.
 */
function linePlot(series, opts) {
  const has = (q) => q.v !== null && q.v !== undefined && Number.isFinite(q.v);
  const pts = series.flatMap((se) => se.points).filter(has);
  if (!pts.length) return h('p', { class: 'empty' }, opts.empty);
  let v0 = Math.min(...pts.map((p) => p.v)), v1 = Math.max(...pts.map((p) => p.v));
  const pad = (v1 - v0) * 0.1 || Math.abs(v1) * 0.1 || 1;
  const top = opts.max === undefined ? v1 + pad : Math.min(opts.max, v1 + pad);
  const nt = niceTicks(Math.max(0, v0 - pad), Math.max(top, v1), 4, opts.scale);
  const { svg, x, y } = plotFrame(opts.label, opts.t0, opts.t1, nt, opts);
  const dots = pts.length > 600 ? 2 : 3.5;
  for (const se of series) {
    const g = s('g', { 'data-version': se.version });
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        g.append(s('polyline', { points: run.map((q) => `${x(q.t)},${y(q.v)}`).join(' '), fill: 'none',
          stroke: se.color, 'stroke-width': 2, 'stroke-dasharray': se.dash ? '5 4' : 'none' }));
      }
      run = [];
    };
    for (const q of se.points) {
      if (!has(q) || (run.length && q.t - run[run.length - 1].t > opts.gap)) flush();
      if (has(q)) run.push(q);
    }
    flush();
    for (const q of se.points.filter(has)) {
      g.append(s('circle', { class: 'pt', cx: x(q.t), cy: y(q.v), r: dots, fill: se.color, 'data-version': se.version },
        s('title', {}, `${se.name}: ${q.title}`)));
    }
    svg.append(g);
  }
  return svg;
}

/** A legend: one swatch per version, and how line styles read, if they differ. */
function legend(styles, lines) {
  return h('div', { class: 'legend' },
    [...styles.values()].map((st) => h('span', { 'data-version': st.version }, h('i', { style: `background:${st.color}` }), st.name)),
    (lines || []).map(([dash, text]) => h('span', {}, h('i', { class: `line${dash ? ' dashed' : ''}` }), text)));
}

/**
 * Colours and names of the versions in `series`: `newVersion` (if any)
 * first, then the others by when they first reported. `roles`, if given,
 * names the new one and the others in the legend (["new", "old"]).
 */
function versionStyles(series, newVersion, roles) {
  const first = (se) => (se.points.length ? se.points[0].t_ms : Infinity);
  const order = [...series].sort((a, b) => (b.version === newVersion) - (a.version === newVersion) || first(a) - first(b));
  const styles = new Map();
  let next = 1;
  for (const se of order) {
    const isNew = se.version === newVersion;
    const color = isNew ? VERSION_COLORS[0] : VERSION_COLORS[Math.min(next++, VERSION_COLORS.length - 1)];
    const role = roles ? roles[isNew ? 0 : 1] : null;
    styles.set(se.version, { version: se.version, color, name: role ? `${se.version} (${role})` : se.version });
  }
  return styles;
}

/** What a point's tooltip says about where it comes from. */
function bucketText(p) {
  const seconds = p.width_ms < MINUTE;
  return `${clock(p.t_ms, seconds)}–${clock(p.t_ms + p.width_ms, seconds)}, ${fmtCount(p.requests)} requests` +
    `${p.devices > 1 ? ` on ${p.devices} devices` : ''}`;
}

/**
 * The time axis of a telemetry answer, in whole buckets (a point sits in
 * the middle of its bucket): to the end of the range, from its start or,
 * when nothing was reported early in the range, from a bucket before the
 * first report (at least six buckets), so a short history is not a
 * sliver at the right edge. `first`: the first report's bucket;
 * `trimmed`: whether the axis starts late.
 */
function timeAxis(t) {
  const width = t.bucket_ms;
  const starts = [...t.series.flatMap((se) => se.points.map((p) => p.t_ms)),
    ...(t.states || []).filter((p) => Object.keys(p.counts).length).map((p) => p.t_ms)];
  const from = Math.floor(t.from_ms / width) * width;
  const t1 = Math.ceil(Math.max(t.to_ms, ...starts.map((x) => x + width)) / width) * width;
  const first = Math.min(...starts);
  const t0 = Math.max(from, Math.min(first - width, t1 - 6 * width));
  return { t0, t1, first, trimmed: t0 > from && Number.isFinite(first) };
}

/**
 * The plots of one model's `series` (from a telemetry answer `t`): latency,
 * accuracy, errors and requests per version, and `states` (a deployment's
 * devices by state), all over the same clock-time axis.
 */
function telemetryPlots(t, series, styles, states) {
  const width = t.bucket_ms;
  const { t0, t1 } = timeAxis(t);
  const base = { t0, t1, gap: width * 1.5 };
  const statesBox = states ? h('div', { class: 'plot-box', 'data-metric': 'states' },
    h('h3', {}, `Devices by state (at the end of each ${span(width)})`), statesPlot(states, t0, t1, width)) : null;
  // Idle versions report too: with nothing to plot, one line says so instead of four empty plots.
  if (!series.some((se) => se.points.some((p) => p.requests > 0 || p.validation))) {
    return h('div', {}, series.length ? h('p', { class: 'empty' },
      `No requests in this range (${series.map((se) => se.version).join(', ')} reported idle).`) : null,
      statesBox ? h('div', { class: 'grid2 telemetry-plots' }, statesBox) : null);
  }
  const pick = (se, value, title, extra) => ({
    version: se.version, name: styles.get(se.version).name, color: styles.get(se.version).color, ...extra,
    points: se.points.map((p) => {
      const v = value(p);
      return { t: p.t_ms + width / 2, v, title: v === null || v === undefined ? '' : `${title(v, p)} (${bucketText(p)})` };
    }),
  });
  // The model's own compute time is in the tooltip: the rest is queueing and transport on the device.
  const latency = series.flatMap((se) => [
    pick(se, (p) => p.latency_ms.p95, (v, p) => `p95 ${fmtMs(v)} (compute ${fmtMs(p.compute_ms.p95)})`),
    pick(se, (p) => p.latency_ms.p50, (v, p) => `p50 ${fmtMs(v)} (compute ${fmtMs(p.compute_ms.p50)})`, { dash: true }),
  ]);
  // Feedback accuracy where a version has feedback; validation accuracy (dashed) where it has none.
  const kinds = new Set();
  const accuracy = series.map((se) => {
    if (se.points.some((p) => p.feedback.accuracy !== null)) {
      kinds.add('feedback');
      return pick(se, (p) => p.feedback.accuracy, (v, p) => `accuracy ${pct(v)} (${fmtCount(p.feedback.correct)} of ${fmtCount(p.feedback.total)} feedback)`);
    }
    kinds.add('validation');
    return pick(se, (p) => (p.validation ? p.validation.accuracy : null),
      (v, p) => `validation accuracy ${pct(v)} (${fmtCount(p.validation.samples)} samples)`, { dash: true });
  });
  const errors = series.map((se) => pick(se, (p) => p.error_rate,
    (v, p) => `${pct(v, 2)} errors (${fmtCount(p.errors)} of ${fmtCount(p.requests)})`));
  // A count, so an idle bucket is a real zero here.
  const rate = series.map((se) => pick(se, (p) => p.requests / (width / SECOND),
    (v) => `${v.toFixed(v < 10 ? 2 : 0)} requests/s`));
  const accLines = kinds.size > 1 ? [[false, 'feedback'], [true, 'validation (no feedback)']] : [];
  const plot = (metric, title, p, lines) => h('div', { class: 'plot-box', 'data-metric': metric }, h('h3', {}, title), p, legend(styles, lines));
  return h('div', { class: 'grid2 telemetry-plots' },
    plot('latency', 'Latency (ms, per request)', linePlot(latency, { ...base, label: 'Latency in milliseconds', scale: 1, suffix: ' ms',
      empty: 'No requests in this range, so no latency.' }), [[false, 'p95'], [true, 'p50']]),
    plot('accuracy', `Accuracy (${kinds.has('feedback') ? 'feedback' : 'validation'}${kinds.size > 1 ? '; validation where no feedback' : ''})`,
      linePlot(accuracy, { ...base, label: 'Accuracy in percent', scale: 100, suffix: '%', max: 1,
        empty: 'No feedback or validation accuracy in this range.' }), accLines),
    plot('errors', 'Error rate (% of requests)', linePlot(errors, { ...base, label: 'Error rate in percent', scale: 100, suffix: '%', max: 1,
      empty: 'No requests in this range, so no error rate.' })),
    plot('requests', 'Requests (per second)', linePlot(rate, { ...base, label: 'Requests per second', scale: 1, suffix: '/s',
      empty: 'No requests in this range.' })),
    statesBox);
}

/** Stacked steps: a deployment's devices per state, bucket by bucket. */
function statesPlot(states, t0, t1, width) {
  const seen = new Set(states.flatMap((p) => Object.keys(p.counts)));
  const order = [...STATES.filter((st) => seen.has(st)), ...[...seen].filter((st) => !STATES.includes(st)).sort()];
  const totals = states.map((p) => order.reduce((n, st) => n + (p.counts[st] || 0), 0));
  if (!order.length) return h('p', { class: 'empty' }, 'No device has reported on this deployment in this range.');
  const nt = niceTicks(0, Math.max(1, ...totals), 4, 1, 1);
  const { svg, x, y } = plotFrame('Devices by state', t0, t1, nt, { scale: 1, suffix: '' });
  let below = states.map(() => 0);
  for (const st of order) {
    const above = states.map((p, i) => below[i] + (p.counts[st] || 0));
    let path = '', back = '';
    states.forEach((p, i) => {
      const x0 = x(Math.max(p.t_ms, t0)), x1 = x(Math.min(p.t_ms + width, t1));
      path += `${i ? 'L' : 'M'}${x0},${y(above[i])}L${x1},${y(above[i])}`;
      back = `L${x1},${y(below[i])}L${x0},${y(below[i])}${back}`;
    });
    svg.append(s('path', { d: `${path}${back}Z`, fill: stateColor(st), opacity: 0.88, 'data-state': st }, s('title', {}, st.replace('_', ' '))));
    below = above;
  }
  // One hover target per bucket, saying what the stack shows there.
  states.forEach((p, i) => {
    const x0 = x(Math.max(p.t_ms, t0)), x1 = x(Math.min(p.t_ms + width, t1));
    const what = order.filter((st) => p.counts[st]).map((st) => `${p.counts[st]} ${st.replace('_', ' ')}`).join(', ') || 'none';
    svg.append(s('rect', { class: 'hover', x: x0, y: y(nt.hi), width: Math.max(0, x1 - x0), height: y(nt.lo) - y(nt.hi) },
      s('title', {}, `${clock(p.t_ms, width < MINUTE)}–${clock(p.t_ms + width, width < MINUTE)}: ${what} (${totals[i]} devices)`)));
  });
  return h('div', {}, svg, h('div', { class: 'legend' },
    order.map((st) => h('span', {}, h('i', { style: `background:${stateColor(st)}` }), st.replace('_', ' ')))));
}

/**
 * A card of telemetry plots with a range picker, kept across refreshes of
 * its page (the picker keeps its choice). `load(range)` fetches for a range
 * key (empty: the API's default) and returns the plots.
 */
function telemetryCard(id, title, ranges, initial, load) {
  let range = initial;
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const picker = h('select', { class: 'range', 'aria-label': 'Time range', onchange: (ev) => { range = ev.target.value; refresh(); } },
    ranges.map(([key, label]) => h('option', { value: key, selected: key === range }, label)));
  const card = h('div', { class: 'card telemetry', id },
    h('div', { class: 'row spread' }, h('h2', {}, title), picker), body);
  const refresh = async () => {
    try { body.replaceChildren(await load(range)); }
    catch (e) { body.replaceChildren(h('p', { class: 'error' }, e.message)); }
  };
  return { card, refresh };
}

/** The query for a range key: from_ms for a span back from now, or nothing (the API's default). */
function rangeQuery(key) {
  const r = RANGES.find(([k]) => k === key);
  return r ? `?from_ms=${Date.now() - r[2]}` : '';
}

/** How the points were made, in a line; the hub's full wording on hover. */
function telemetryNote(t) {
  const axis = timeAxis(t);
  return h('p', { class: 'muted note', title: t.combination },
    `${clock(t.from_ms)} to ${clock(t.to_ms)}${axis.trimmed ? `, nothing reported before ${clock(axis.first, true)}` : ''}; ` +
    `each point is ${span(t.bucket_ms)} of reports (${t.resolution} series): ` +
    'latency percentiles of every request in it, rates over its totals.');
}

function hasPoints(series) { return series.some((se) => se.points.length); }

/** A deployment's versions over time, combined across its devices, and its devices by state. */
function deploymentTelemetry(d) {
  const ranges = [['', 'From 15 min before it'], ...RANGES];
  return telemetryCard('deployment-telemetry-card', 'Old version against new, over time', ranges, '', async (range) => {
    const t = await api('GET', `/deployments/${d.id}/telemetry${rangeQuery(range)}`);
    const states = t.states || [];
    if (!hasPoints(t.series) && !states.some((p) => Object.keys(p.counts).length)) {
      return h('p', { class: 'empty', id: 'no-telemetry' }, NO_TELEMETRY);
    }
    const styles = versionStyles(t.series, d.version, ['new', 'old']);
    return h('div', { id: 'deployment-telemetry', 'data-from-ms': t.from_ms, 'data-to-ms': t.to_ms }, telemetryNote(t),
      hasPoints(t.series) ? null : h('p', { class: 'empty' }, NO_TELEMETRY),
      telemetryPlots(t, t.series, styles, states));
  });
}

/** A device's models over time, per version; the version it should run is marked. */
function deviceTelemetry(id, desired) {
  return telemetryCard('device-telemetry-card', 'Versions over time, from reports', RANGES, '1h', async (range) => {
    const t = await api('GET', `/devices/${encodeURIComponent(id)}/telemetry${rangeQuery(range)}`);
    if (!hasPoints(t.series)) return h('p', { class: 'empty', id: 'no-telemetry' }, NO_TELEMETRY);
    const models = [...new Set(t.series.filter((se) => se.points.length).map((se) => se.model))].sort();
    return h('div', { id: 'device-telemetry', 'data-from-ms': t.from_ms, 'data-to-ms': t.to_ms }, telemetryNote(t), models.map((model) => {
      const series = t.series.filter((se) => se.model === model && se.points.length);
      // The newest version (last to start reporting) takes the new version's colour, as on a deployment page.
      const newest = [...series].sort((a, b) => b.points[0].t_ms - a.points[0].t_ms
        || b.version.localeCompare(a.version, undefined, { numeric: true }))[0].version;
      const styles = versionStyles(series, newest, null);
      const want = (desired.get(model) || {}).version;
      if (want && styles.has(want)) styles.get(want).name = `${want} (should run)`;
      return h('section', { class: 'model-telemetry', 'data-model': model },
        models.length > 1 ? h('h3', { class: 'model' }, model) : null, telemetryPlots(t, series, styles, null));
    }));
  });
}

/**
 * A rollout decision's evidence (a rollout_phase or rolled_back event): a
 * line comparing the new version with the old, and in full when opened.
 * `open` keeps which are open across refreshes.
 */
function evidenceView(e, open) {
  const ev = e.evidence;
  const c = ev.candidate || {}, b = ev.baseline || null;
  const acc = (w) => (w && w.feedback_total ? w.feedback_correct / w.feedback_total : null);
  const vs = (f, w) => (w ? f(w) : 'nothing');
  const parts = [];
  if (c.p95_ms !== null && c.p95_ms !== undefined) parts.push(`compute p95 ${fmtMs(c.p95_ms)} vs ${vs((w) => fmtMs(w.p95_ms), b)}`);
  if (c.feedback_total) parts.push(`accuracy ${pct(acc(c), 0)} vs ${vs((w) => pct(acc(w), 0), b)} over ${fmtCount(c.feedback_total)} samples`);
  else if (c.validation_accuracy !== null && c.validation_accuracy !== undefined) {
    parts.push(`validation accuracy ${pct(c.validation_accuracy, 0)} vs ${vs((w) => pct(w.validation_accuracy, 0), b)}`);
  }
  if (c.errors || (b && b.errors)) parts.push(`errors ${fmtCount(c.errors)}/${fmtCount(c.requests)} vs ${vs((w) => `${fmtCount(w.errors)}/${fmtCount(w.requests)}`, b)}`);
  if (c.agreement_total) parts.push(`agreement ${pct(c.agreement_agreed / c.agreement_total, 0)}`);
  if (e.kind === 'rolled_back') parts.push(`switched in ${fmtCount(ev.switch_us)} µs`);
  const key = `${e.at_ms}/${e.kind}/${e.version}`;
  const rows = [
    ['Requests', (w) => fmtCount(w.requests)],
    ['Errors', (w) => fmtCount(w.errors)],
    ['Compute p50', (w) => fmtMs(w.p50_ms)], ['Compute p95', (w) => fmtMs(w.p95_ms)], ['Compute p99', (w) => fmtMs(w.p99_ms)],
    ['Feedback accuracy', (w) => (w.feedback_total ? `${pct(acc(w))} (${fmtCount(w.feedback_correct)}/${fmtCount(w.feedback_total)})` : '—')],
    ['Shadow agreement', (w) => (w.agreement_total ? `${pct(w.agreement_agreed / w.agreement_total)} (${fmtCount(w.agreement_agreed)}/${fmtCount(w.agreement_total)})` : '—')],
    ['Validation accuracy', (w) => pct(w.validation_accuracy)],
    ['Worker restarts', (w) => fmtCount(w.restarts)],
  ];
  const details = h('details', { class: 'evidence', 'data-evidence': ev.kind || 'phase', open: open.has(key),
    ontoggle: (x) => (x.target.open ? open.add(key) : open.delete(key)) },
  h('summary', {}, `${ev.kind ? `${ev.kind.replace('_', ' ')}: ` : ''}${parts.join(', ') || 'no requests compared'}`),
  h('table', {},
    h('thead', {}, h('tr', {}, h('th', {}, ''), h('th', {}, `${e.version} (new)`), h('th', {}, 'old'))),
    h('tbody', {}, rows.map(([label, f]) => h('tr', {}, h('td', {}, label), h('td', { class: 'num' }, f(c)),
      h('td', { class: 'num' }, b ? f(b) : '—'))))),
  h('p', { class: 'muted' }, [
    // An operator's or the hub's rollback was not detected: it has no figures for this.
    ev.detected_after_samples || ev.detected_after_ms
      ? `Decided after ${fmtCount(ev.detected_after_samples)} samples and ${took(ev.detected_after_ms || 0)}.` : null,
    e.kind === 'rolled_back' ? `Traffic moved back in ${fmtCount(ev.switch_us)} µs.` : null,
    'Compute times are the model\'s own, as the rollout compares them.',
  ].filter(Boolean).join(' ')));
  return details;
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

async function deviceView(id) {
  const content = h('div', {});
  // Kept across refreshes: what the device should run (updated by each
  // load), the telemetry card and its range, and which evidence is open.
  const desired = new Map();
  const telemetry = deviceTelemetry(id, desired);
  const open = new Set();
  const load = async () => {
    const d = await api('GET', `/devices/${encodeURIComponent(id)}`);
    desired.clear();
    for (const x of d.desired || []) desired.set(x.model, x);
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
              h('td', { class: 'reason' }, m.detail))))),
          h('h3', {}, 'Should run'),
          (d.desired || []).length ? h('ul', {}, d.desired.map((x) => h('li', {}, `${x.model} ${x.version} `,
            h('a', { href: `#/deployments/${x.deployment_id}` }, `(deployment #${x.deployment_id})`))))
            : h('p', { class: 'muted' }, 'nothing'))),
      telemetry.card,
      h('div', { class: 'card' }, h('h2', {}, 'Events'),
        (d.events || []).length ? h('table', { id: 'device-events', class: 'stack' },
          h('thead', {}, h('tr', {}, ['When', 'Event', 'Model', 'Reason'].map((t) => h('th', {}, t)))),
          h('tbody', {}, d.events.map((e) => h('tr', { 'data-kind': e.kind },
            h('td', {}, timeCell(e.at_ms)), h('td', {}, e.kind), h('td', {}, e.model ? `${e.model} ${e.version}` : ''),
            h('td', { class: 'reason' }, e.reason, e.evidence ? evidenceView(e, open) : null)))))
          : h('p', { class: 'empty' }, 'No events reported.')));
    await telemetry.refresh();
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
