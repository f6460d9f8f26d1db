// Cloud48's web console: one page that reads and changes the platform through the REST API
// (`/v1`, signed in with the browser's own HTTP Digest) and follows `/v1/events` to stay live.
// No framework and no build step: the core embeds this file as it is.

const TOPICS = ["command", "container", "server", "environment"];

// ---- DOM and formatting helpers -------------------------------------------------------------

/** An element with attributes (`on*` are listeners) and children (strings become text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const status = (s) => h("span", { class: `status ${s}`, dataset: { status: s } }, s);
const link = (href, text) => h("a", { href }, text);
const containerLink = (id) => (id == null ? "–" : link(`#/containers/${id}`, `#${id}`));
const commandLink = (id) => (id == null ? "–" : link(`#/commands/${id}`, `#${id}`));
/** A command's target: a link to the container or environment. */
const targetLink = (c) => (c.target_type === "container" ? containerLink(c.target_id)
  : c.target_type === "environment" ? link(`#/environments/${c.target_id}`, `environment ${c.target_id}`)
    : "–");

function when(ms) {
  if (ms == null) return h("span", { class: "muted" }, "–");
  const d = new Date(ms);
  return h("time", { class: "time", datetime: d.toISOString(), title: d.toISOString() },
    d.toLocaleString());
}

function ago(ms) {
  if (ms == null) return h("span", { class: "muted time" }, "never");
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return h("span", { class: "time" }, s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`);
}

/** A load bar: `used` of `total`, labelled with `fmt`. */
function bar(used, total, fmt, what) {
  const frac = total > 0 ? Math.min(1, used / total) : 0;
  const fill = h("span");
  fill.style.width = `${(frac * 100).toFixed(1)}%`;
  return h("span", { class: "load", title: `${what}: ${fmt(used)} of ${fmt(total)}` },
    h("span", { class: frac > 0.85 ? "bar high" : "bar", role: "meter", "aria-label": what,
      "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": used }, fill),
    h("span", { class: "barlabel" }, `${fmt(used)} / ${fmt(total)}`));
}

const cores = (m) => (m === 1000 ? "1 core" : `${(m / 1000).toFixed(m % 1000 ? 1 : 0)} cores`);
const mib = (m) => (m >= 1024 ? `${(m / 1024).toFixed(m % 1024 ? 1 : 0)} GiB` : `${m} MiB`);

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

// ---- The API --------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Whether the user signed in (the browser holds the credentials). */
let signedIn = false;

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  // Not signed in: a refusal must not make the browser ask for a password (only "Sign in"
  // does). Signed in: the browser answers a challenge (an expired nonce) by itself.
  if (!signedIn && path !== "/v1/sign-in") init.headers["X-Cloud48-No-Challenge"] = "1";
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    throw new ApiFailure(resp.status, data?.error?.message ?? `${resp.status} ${resp.statusText}`);
  }
  return data;
}

const get = (path) => api("GET", path);

function notice(message, kind = "error") {
  const el = document.getElementById("notice");
  el.replaceChildren(...(Array.isArray(message) ? message : [message]));
  el.className = kind;
  el.hidden = false;
}

/** Submits a change; tells which command carries it out (the view follows through events). */
async function act(what, method, path, body) {
  try {
    const out = await api(method, path, body);
    if (out?.command_id != null) {
      notice([`${what}: command `, commandLink(out.command_id), " submitted"], "info");
    } else if (out?.commands) {
      notice(`${what}: ${out.commands.length} migrations submitted` +
        (out.skipped?.length ? `; skipped: ${out.skipped.join("; ")}` : ""), "info");
    } else {
      notice(`${what}: done`, "info");
    }
    refresh();
    return out;
  } catch (e) {
    notice(`${what}: ${e.message}`);
    return null;
  }
}

function button(text, onclick, cls) {
  return h("button", { type: "button", class: cls, onclick }, text);
}

// ---- Views: each has a part built once per visit (forms keep what is typed in them) and a
// part `load` rebuilds on every change the event stream reports. ----------------------------

async function fleetView() {
  return {
    nav: "fleet",
    title: "Fleet",
    async load() {
      const servers = await get("/v1/servers");
      const rows = servers.map((s) => h("tr", { dataset: { server: s.name } },
        h("td", {}, h("strong", {}, s.name), h("div", { class: "muted" }, s.labels.join(", "))),
        h("td", {}, s.driver),
        h("td", {}, status(s.status), s.draining ? [" ", status("draining")] : ""),
        h("td", {}, bar(s.allocated.cpu_millis, s.capacity.cpu_millis, cores, "CPU")),
        h("td", {}, bar(s.allocated.memory_mb, s.capacity.memory_mb, mib, "Memory")),
        h("td", {}, bar(s.allocated.disk_mb, s.capacity.disk_mb, mib, "Disk")),
        h("td", { class: "num" }, s.containers - s.dummies),
        h("td", {}, ago(s.last_heartbeat)),
        h("td", { class: "actions" }, serverActions(s))));
      return table(["Server", "Driver", "Status", "CPU", "Memory", "Disk", "Containers",
        "Heartbeat", ""], rows, "No servers yet: add one with `cloud48 server add`.");
    },
  };
}

/** What an operator may do with server `s`: drain or undrain it, or, when it is a node agent's
 * server that is down, remove it (the core refuses while its agent beats or containers stay). */
function serverActions(s) {
  if (s.status === "down" && s.driver === "remote") {
    return button("Remove", () => {
      if (confirm(`Remove ${s.name} for good? Its agent must be gone; an agent starting under its name later registers a new server.`)) {
        act(`remove ${s.name}`, "DELETE", `/v1/servers/${s.name}`);
      }
    });
  }
  if (s.draining) {
    return button("Undrain", () => act(`undrain ${s.name}`, "POST", `/v1/servers/${s.name}/undrain`));
  }
  return button("Drain", () => {
    if (confirm(`Migrate every container away from ${s.name}?`)) {
      act(`drain ${s.name}`, "POST", `/v1/servers/${s.name}/drain`);
    }
  });
}

async function environmentsView() {
  const name = h("input", { name: "name", placeholder: "name (a-z, 0-9, -)", required: true,
    pattern: "[a-z0-9][a-z0-9-]{0,62}" });
  const projects = await get("/v1/projects").catch(() => []);
  const project = h("select", { name: "project", "aria-label": "Project" },
    projects.map((p) => h("option", { value: p.name }, p.name)));
  const form = h("form", { class: "inline", id: "create-environment" }, name, project,
    h("button", { type: "submit" }, "Create environment"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: name.value, project: project.value || null };
    if (await act(`create ${name.value}`, "POST", "/v1/environments", body)) {
      name.value = "";
    }
  });
  return {
    nav: "environments",
    title: "Environments",
    top: [form],
    async load() {
      const envs = await get("/v1/environments");
      const rows = envs.map((e) => h("tr", { dataset: { environment: e.name } },
        h("td", {}, link(`#/environments/${e.name}`, e.name)),
        h("td", {}, e.project),
        h("td", {}, status(e.status)),
        h("td", { class: "num" }, e.members.length),
        h("td", {}, [...new Set(e.members.map((m) => m.type))].join(", ")),
        h("td", {}, commandLink(e.locked_by)),
        h("td", {}, when(e.created_at))));
      return table(["Name", "Project", "Status", "Members", "Types", "Locked by", "Created"], rows,
        "No environments yet.");
    },
  };
}

async function serverChoice() {
  const servers = await get("/v1/servers").catch(() => []);
  return h("select", { name: "server", "aria-label": "Target server" },
    h("option", { value: "" }, "placement chooses"),
    servers.filter((s) => s.status === "up" && !s.draining)
      .map((s) => h("option", { value: s.name }, s.name)));
}

function memberActions(c) {
  const run = (op) => act(`${op} #${c.id}`, "POST", `/v1/containers/${c.id}/actions`, { op });
  return h("td", { class: "actions" },
    c.status === "stopped" ? button("Start", () => run("start")) : "",
    c.status === "running" ? button("Stop", () => run("stop")) : "");
}

async function environmentView(name) {
  const plugins = await get("/v1/plugins").catch(() => []);
  const type = h("select", { name: "type", "aria-label": "Container type" },
    plugins.map((p) => h("option", { value: p.name }, `${p.name} (${p.description})`)));
  const add = h("form", { class: "inline", id: "add-container" }, type,
    h("button", { type: "submit" }, "Add container"));
  add.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(`add ${type.value} to ${name}`, "POST", `/v1/environments/${name}/containers`,
      { type: type.value });
  });
  const op = (o) => act(`${o} ${name}`, "POST", `/v1/environments/${name}/${o}`);
  const ops = h("div", { class: "actions" },
    button("Start all", () => op("start")), button("Stop all", () => op("stop")),
    button("Destroy", () => {
      if (confirm(`Destroy ${name} and all its containers?`)) {
        act(`destroy ${name}`, "DELETE", `/v1/environments/${name}`);
      }
    }, "danger"));
  return {
    nav: "environments",
    title: `Environment ${name}`,
    top: [ops, add],
    async load() {
      const e = await get(`/v1/environments/${encodeURIComponent(name)}`);
      const rows = e.members.map((c) => h("tr", { dataset: { container: c.id } },
        h("td", { class: "num" }, c.priority),
        h("td", {}, containerLink(c.id)),
        h("td", {}, c.type),
        h("td", {}, status(c.status)),
        h("td", {}, c.server ?? "–"),
        h("td", {}, c.ip ?? "–"),
        memberActions(c),
        h("td", {}, button("Remove", () => {
          if (confirm(`Remove #${c.id} from ${name}?`)) {
            act(`remove #${c.id}`, "DELETE", `/v1/environments/${name}/containers/${c.id}`);
          }
        }, "danger"))));
      return [
        facts([["Id", e.id], ["Project", e.project], ["Status", status(e.status)],
          ["Locked by", commandLink(e.locked_by)],
          ["Parameters", Object.entries(e.params ?? {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
          ["Created", when(e.created_at)]]),
        h("h2", {}, "Members by priority"),
        table(["Priority", "Container", "Type", "Status", "Server", "IP", "", ""], rows,
          "No members yet: add a container."),
      ];
    },
  };
}

async function containerView(id) {
  const target = await serverChoice();
  const run = (op, extra = {}) =>
    act(`${op} #${id}`, "POST", `/v1/containers/${id}/actions`, { op, ...extra });
  const ops = h("div", { class: "actions" },
    button("Start", () => run("start")), button("Stop", () => run("stop")),
    button("Reboot", () => run("reboot")),
    h("span", {}, target, " ", button("Migrate", () => run("migrate", { to: target.value || null }))),
    button("Destroy", () => {
      if (confirm(`Destroy container #${id}?`)) act(`destroy #${id}`, "DELETE", `/v1/containers/${id}`);
    }, "danger"));
  return {
    nav: "environments",
    title: `Container #${id}`,
    top: [ops],
    async load() {
      const [c, cmds, logs] = await Promise.all([
        get(`/v1/containers/${id}`),
        get(`/v1/commands?target_type=container&target_id=${id}&limit=20`).catch(() => []),
        get(`/v1/containers/${id}/logs`).then((l) => l.logs, (e) => `(${e.message})`),
      ]);
      const r = c.requirements;
      return [
        facts([["Type", c.type], ["Project", c.project], ["Status", status(c.status)],
          ...(c.status_reason ? [["Why", c.status_reason]] : []),
          ["Environment", c.environment ? link(`#/environments/${c.environment}`, c.environment) : "–"],
          ["Server", c.server ?? "–"], ["IP", c.ip ?? "–"], ["Guest", h("code", { class: "guest" }, c.guest_id)],
          ["Resources", `${cores(r.cpu_millis)}, ${mib(r.memory_mb)} memory, ${mib(r.disk_mb)} disk`],
          ["Priority", c.priority], ["Locked by", commandLink(c.locked_by)],
          ["Parameters", Object.entries(c.params ?? {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
          ["Created", when(c.created_at)]]),
        h("h2", {}, "Plugin state"),
        h("pre", { id: "plugin-state" }, c.inspect == null ? "(none)" : JSON.stringify(c.inspect, null, 2)),
        h("h2", {}, "Scripts run inside"),
        table(["Command", "Status", "Script", "Arguments"], (c.execs ?? []).map((x) => h("tr", {},
          h("td", {}, commandLink(x.command_id)), h("td", {}, status(x.status)),
          h("td", {}, h("code", {}, x.script)), h("td", {}, x.args.join(" ")))), "None yet."),
        h("h2", {}, "Commands"),
        commandTable(cmds),
        h("h2", {}, "Logs"),
        h("pre", { id: "logs" }, logs || "(empty)"),
      ];
    },
  };
}

function commandTable(cmds) {
  return table(["Command", "Kind", "Status", "Target", "Parent", "By", "Submitted", "Error"],
    cmds.map((c) => h("tr", { dataset: { command: c.id } },
      h("td", {}, commandLink(c.id)),
      h("td", {}, c.kind),
      h("td", {}, status(c.status), c.waiting_on ? h("div", { class: "muted" }, c.waiting_on) : ""),
      h("td", {}, targetLink(c)),
      h("td", {}, commandLink(c.parent)),
      h("td", {}, c.requested_by),
      h("td", {}, when(c.created_at)),
      h("td", {}, c.error ?? ""))),
    "No commands.");
}

async function commandsView() {
  return {
    nav: "commands",
    title: "Command queue",
    async load() {
      return commandTable(await get("/v1/commands?limit=100"));
    },
  };
}

async function commandView(id) {
  return {
    nav: "commands",
    title: `Command #${id}`,
    top: [h("div", { class: "actions" }, button("Cancel", () =>
      act(`cancel #${id}`, "POST", `/v1/commands/${id}/cancel`)))],
    async load() {
      const [c, children] = await Promise.all([
        get(`/v1/commands/${id}`),
        get(`/v1/commands?parent=${id}&limit=1000`),
      ]);
      return [
        facts([["Kind", c.kind], ["Status", status(c.status)],
          ["Target", targetLink(c)],
          ["Parent", commandLink(c.parent)], ["Step", c.step], ["Retries", c.attempts],
          ["Waiting on", c.waiting_on ?? "–"], ["Requested by", c.requested_by],
          ["Submitted", when(c.created_at)], ["Finished", when(c.finished_at)],
          ["Result", c.result == null ? "–" : h("code", {}, JSON.stringify(c.result))],
          ["Error", c.error ?? "–"]]),
        h("h2", {}, "Children"),
        commandTable(children),
        h("h2", {}, "Log"),
        h("pre", { id: "command-log" }, c.log?.length
          ? c.log.map((l) => `${new Date(l.at).toISOString()} ${l.level}` +
            `${l.container != null ? ` #${l.container}` : ""} ${l.message}`).join("\n")
          : "(empty)"),
      ];
    },
  };
}

// ---- Routing and live updates ---------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  switch (parts[0]) {
    case "":
    case "fleet": return fleetView();
    case "environments": return parts[1] ? environmentView(parts[1]) : environmentsView();
    case "containers": return containerView(Number(parts[1]));
    case "commands": return parts[1] ? commandView(Number(parts[1])) : commandsView();
    default: return Promise.resolve({ title: "Not found", load: async () =>
      h("p", {}, "No such page: ", link("#/", "back to the fleet")) });
  }
}

let current = null;
let generation = 0;

async function show() {
  const mine = ++generation;
  document.getElementById("notice").hidden = true;
  try {
    const view = await route();
    if (mine !== generation) return;
    current = { view, data: h("div", { id: "data" }) };
    document.title = `${view.title} · Cloud48`;
    for (const a of document.querySelectorAll("header nav a")) {
      a.classList.toggle("active", a.dataset.nav === view.nav);
    }
    document.getElementById("view").replaceChildren(h("h1", {}, view.title), ...(view.top ?? []),
      current.data);
    await refresh();
  } catch (e) {
    notice(e.message);
  }
}

let pending = null;

/** Rebuilds the current view's data (at most once per 150 ms however many events arrive). */
async function refresh() {
  if (!current) return;
  const { view, data } = current;
  try {
    const content = await view.load();
    if (current?.data !== data) return;
    data.replaceChildren(...[content].flat());
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    if (current?.data !== data) return;
    data.replaceChildren(h("p", { class: "muted" }, e.message));
    if (e.status === 401 || e.status === 403) {
      data.append(h("p", {}, "Sign in (top right) to see more."));
    }
  }
}

function refreshSoon() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    refresh();
  }, 150);
}

let stream = null;

function follow() {
  stream?.close();
  const live = document.getElementById("live");
  stream = new EventSource("/v1/events");
  stream.addEventListener("ready", () => {
    live.textContent = "live";
    live.className = "live";
  });
  for (const t of TOPICS) {
    stream.addEventListener(t, (ev) => {
      live.textContent = `live · event ${ev.lastEventId}`;
      refreshSoon();
    });
  }
  stream.onerror = () => {
    if (stream.readyState === EventSource.CLOSED) {
      live.textContent = "offline";
      live.className = "live off";
      // Refused (not signed in) or the core is gone: try again later.
      setTimeout(follow, 5000);
    }
  };
}

async function identify(path) {
  const who = document.getElementById("who");
  try {
    const me = await get(path);
    signedIn = Boolean(me.user);
    who.textContent = me.user ? `${me.user} (${me.role})` : me.role ? "anonymous (full access)" : "anonymous";
    document.getElementById("sign-in").hidden = Boolean(me.user);
    return me;
  } catch (e) {
    notice(`Sign-in failed: ${e.message}`);
    return null;
  }
}

document.getElementById("sign-in").addEventListener("click", async () => {
  if (await identify("/v1/sign-in")) {
    follow();
    show();
  }
});
window.addEventListener("hashchange", show);
identify("/v1/whoami");
follow();
show();
