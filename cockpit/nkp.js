/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkp's Cockpit page.  Every read and every action is one `nkpctl --json …`
 * run as root (cockpit.spawn, superuser "require"): the rules of the
 * command line hold here because the command line does the work.  Errors
 * are nkpctl's own line, shown as it says it.
 *
 * Passwords go to nkpctl on its stdin (--password-stdin), never
 * in argv.  A backup is written by nkpctl into a fresh root-only directory
 * under /run (tmpfs), read back through cockpit.file and removed at once;
 * an uploaded backup takes the same way in. */
"use strict";

const NKPCTL = "nkpctl";
const ROOT = { superuser: "require", err: "message" };

/* ---- running nkpctl ------------------------------------------------------ */

function errorText(ex) {
    const text = (ex && (ex.message || ex.problem)) || String(ex);
    return text.trim();
}

/* nkpctl --json ARGS…; resolves to its JSON document. */
function nkpctl(args, input) {
    const opts = Object.assign({}, ROOT);
    const proc = cockpit.spawn([NKPCTL, "--json"].concat(args), opts);
    if (input !== undefined)
        proc.input(input);
    return proc.then(out => out.trim() ? JSON.parse(out) : null);
}

/* The same for the long VM verbs, with --progress=json: each step's line
 * (`{"progress":{…}}`) goes to onStep, the rest is the result document. */
function nkpctlWithProgress(args, onStep) {
    const proc = cockpit.spawn([NKPCTL, "--json"].concat(args, ["--progress=json"]), ROOT);
    let pending = "";
    let result = "";
    proc.stream(chunk => {
        pending += chunk;
        let nl;
        while ((nl = pending.indexOf("\n")) >= 0) {
            const line = pending.slice(0, nl);
            pending = pending.slice(nl + 1);
            if (line.startsWith('{"progress"'))
                onStep(JSON.parse(line).progress);
            else
                result += line + "\n";
        }
    });
    return proc.then(() => {
        result += pending;
        return result.trim() ? JSON.parse(result) : null;
    });
}

/* Runs body(dir) with a fresh root-only directory on tmpfs, removed after. */
async function withTempDir(body) {
    const dir = (await cockpit.spawn(["mktemp", "-d", "/run/nkp-cockpit.XXXXXX"], ROOT)).trim();
    try {
        return await body(dir);
    } finally {
        await cockpit.spawn(["rm", "-rf", "--", dir], ROOT).catch(() => {});
    }
}

/* ---- small DOM helpers ------------------------------------------------------- */

function $(id) {
    return document.getElementById(id);
}

function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
        if (k === "class")
            node.className = v;
        else if (k.startsWith("on"))
            node.addEventListener(k.slice(2), v);
        else if (v !== false && v !== null && v !== undefined)
            node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children)
        if (c !== null && c !== undefined && c !== false)
            node.append(c instanceof Node ? c : String(c));
    return node;
}

function label(text, colour) {
    return el("span", { class: "label" + (colour ? " label-" + colour : "") }, text);
}

function button(text, action, cls, testName) {
    return el("button", { type: "button", class: "btn " + (cls || "btn-secondary btn-small"),
                          "data-action": testName || text, onclick: action }, text);
}

function showError(text) {
    $("error-text").textContent = text;
    $("error").hidden = false;
}

function showNotice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
}

/* ---- the dialog ------------------------------------------------------------ */

let dialogAction = null;

/* A modal: `body` (nodes), the OK button's text, and `action`, an async
 * function run on OK; its error stays in the dialog, success closes it
 * and refreshes the page. */
function openDialog(title, body, okText, action, danger) {
    $("dialog-title").textContent = title;
    $("dialog-body").replaceChildren(...body);
    $("dialog-error").hidden = true;
    $("dialog-ok").textContent = okText;
    $("dialog-ok").className = "btn " + (danger ? "btn-danger" : "btn-primary");
    $("dialog-ok").disabled = false;
    dialogAction = action;
    $("dialog").hidden = false;
    const first = $("dialog-body").querySelector("input, select");
    if (first)
        first.focus();
}

function closeDialog() {
    $("dialog").hidden = true;
    dialogAction = null;
    // No password lingers in the page once its dialog is done.
    for (const input of $("dialog-body").querySelectorAll('input[type="password"]'))
        input.value = "";
    $("dialog-body").replaceChildren();
}

async function submitDialog(event) {
    event.preventDefault();
    if (!dialogAction)
        return;
    // Both buttons off while nkpctl runs: closing the dialog would not stop it.
    $("dialog-ok").disabled = $("dialog-cancel").disabled = true;
    $("dialog-error").hidden = true;
    try {
        const notice = await dialogAction();
        closeDialog();
        showNotice(notice || "");
        await refresh();
    } catch (ex) {
        $("dialog-error").textContent = errorText(ex);
        $("dialog-error").hidden = false;
    } finally {
        $("dialog-ok").disabled = $("dialog-cancel").disabled = false;
    }
}

function field(labelText, input, help) {
    return el("div", {}, el("label", { for: input.id }, labelText), input,
              help ? el("p", { class: "help" }, help) : null);
}

/* ---- providers -------------------------------------------------------------- */

let providers = [];

function createProvider() {
    const name = el("input", { type: "text", id: "create-name", autocomplete: "off" });
    const tpm = el("input", { type: "checkbox", id: "create-require-tpm" });
    openDialog("Create a key provider", [
        field("Name", name, "Letters, digits, '.', '_' and '-'. A new provider stays inactive until it is backed up."),
        el("label", { class: "check" }, tpm, " Require a TPM 2.0 (only hosts with a TPM may hold it)"),
    ], "Create", async () => {
        const args = ["provider", "create", name.value];
        if (tpm.checked)
            args.push("--require-tpm");
        const p = await nkpctl(args);
        return `Created provider '${p.name}'. Back it up to activate it.`;
    });
}

function download(bytes, filename) {
    const url = URL.createObjectURL(new Blob([bytes], { type: "application/x-pkcs12" }));
    const a = el("a", { href: url, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function backupProvider(p) {
    const pw1 = el("input", { type: "password", id: "backup-password", autocomplete: "new-password" });
    const pw2 = el("input", { type: "password", id: "backup-password2", autocomplete: "new-password" });
    openDialog(`Back up provider '${p.name}'`, [
        el("p", {}, "The browser downloads a password-protected PKCS#12 file (",
           el("span", { class: "mono" }, p.name + ".p12"),
           "). Keep the file and its password apart, off this host: they restore the provider anywhere."),
        field("Password", pw1),
        field("Repeat the password", pw2),
    ], "Back up", async () => {
        if (!pw1.value)
            throw new Error("Type a password.");
        if (pw1.value !== pw2.value)
            throw new Error("The two passwords differ; nothing was written.");
        const bytes = await withTempDir(async dir => {
            const file = `${dir}/${p.name}.p12`;
            await nkpctl(["provider", "backup", p.name, "--out", file, "--password-stdin"],
                         pw1.value + "\n");
            return cockpit.file(file, { binary: true, superuser: "require" }).read();
        });
        download(bytes, p.name + ".p12");
        return `Backed up provider '${p.name}' to ${p.name}.p12 (downloaded).`;
    });
}

function restoreProvider() {
    const file = el("input", { type: "file", id: "restore-file", accept: ".p12,.pfx,application/x-pkcs12" });
    const pw = el("input", { type: "password", id: "restore-password", autocomplete: "off" });
    openDialog("Restore a provider from its backup", [
        field("Backup file (.p12)", file),
        field("Password", pw, "The same name, key ID and fingerprint come back. A restored provider is never the default: set it."),
    ], "Restore", async () => {
        if (!file.files.length)
            throw new Error("Choose the backup file.");
        const bytes = new Uint8Array(await file.files[0].arrayBuffer());
        const p = await withTempDir(async dir => {
            const path = `${dir}/upload.p12`;
            await cockpit.file(path, { binary: true, superuser: "require" }).replace(bytes);
            return nkpctl(["provider", "restore", path, "--password-stdin"], pw.value + "\n");
        });
        return p.already ? `Provider '${p.name}' is already present; nothing changed.`
            : `Restored provider '${p.name}' (key ID ${p.key_id}).`;
    });
}

async function setDefault(p) {
    showNotice("");
    try {
        await nkpctl(["provider", "set-default", p.name]);
        showNotice(`Provider '${p.name}' is the default.`);
        await refresh();
    } catch (ex) {
        showError(errorText(ex));
    }
}

function deleteProvider(p) {
    const users = p.usage && p.usage.length
        ? el("p", {}, "Used by: ", el("strong", {}, p.usage.join(", ")),
             ". nkp refuses to delete a provider while VMs depend on it.")
        : null;
    openDialog(`Delete provider '${p.name}'?`, [
        el("p", {}, "Its key leaves this host's store; VMs it protects will not start after the next reboot unless it is restored from its backup."),
        users,
    ], "Delete", async () => {
        await nkpctl(["provider", "delete", p.name]);
        return `Deleted provider '${p.name}'.`;
    }, true);
}

function usageCell(p) {
    if (p.usageError)
        return el("span", { class: "muted", title: p.usageError }, "unknown");
    if (!p.usage.length)
        return el("span", { class: "muted" }, "none");
    return p.usage.join(", ");
}

function renderProviders() {
    const rows = providers.map(p => el("tr", { "data-provider": p.name },
        el("td", {}, el("strong", {}, p.name), p.require_tpm ? el("div", { class: "muted" }, "requires a TPM") : null),
        el("td", { class: "mono" }, p.key_id),
        el("td", { class: "mono", title: p.fingerprint }, p.fingerprint.slice(0, 16) + "…"),
        el("td", {}, p.sealed === "tpm" ? label("TPM", "green") : label("none", "orange")),
        el("td", { "data-field": "backed_up" },
           p.backed_up ? label("Backed up", "green") : label("Not backed up", "red")),
        el("td", { "data-field": "default" }, p.default ? label("Default", "blue") : ""),
        el("td", { "data-field": "usage" }, usageCell(p)),
        el("td", { class: "actions" },
           button("Back up", () => backupProvider(p)),
           button("Set default", () => setDefault(p), null, "Set default"),
           button("Delete", () => deleteProvider(p)))));
    $("providers").tBodies[0].replaceChildren(...rows);
    for (const row of rows) {
        const p = providers.find(x => x.name === row.dataset.provider);
        row.querySelector('[data-action="Set default"]').disabled = p.default;
    }
    $("no-providers").hidden = providers.length > 0;
}

/* ---- alarms, host ---------------------------------------------------------------- */

function renderAlarms(alarms) {
    $("alarms").replaceChildren(...alarms.map(a => el("li", { class: "alarm-" + a.kind, "data-kind": a.kind },
        el("span", { class: "alarm-kind" }, a.kind), a.message)));
    $("no-alarms").hidden = alarms.length > 0;
}

async function hostUnlock() {
    showNotice("");
    $("error").hidden = true;
    try {
        const list = await nkpctl(["host", "unlock"]);
        const unlocked = (list || []).filter(s => s.state === "encrypted").map(s => s.name);
        showNotice(unlocked.length ? "Unlocked: " + unlocked.join(", ") + "." : "No VM needed unlocking.");
    } catch (ex) {
        showError(errorText(ex));
    }
    await refresh();
}

function renderHost(h) {
    $("host-tpm").textContent = h.tpm.in_use
        ? `${h.tpm.tcti} (${h.tpm.answers ? "answers" : "does not answer"})`
        : "none: provider keys rest unsealed in /var/lib/nkp";
    const cached = h.cached_providers.map(c => c.name + (c.deleted ? " (deleted from the store)" : ""));
    $("host-cache").textContent = cached.length ? cached.join(", ") : "none";
    const prot = h.host_key.protected.map(d => `${d.dir} (${d.state})`);
    $("host-key").textContent = h.host_key.provider
        ? `provider '${h.host_key.provider}'` + (prot.length ? ": " + prot.join(", ") : "")
        : "not in use";
}

/* ---- VMs ------------------------------------------------------------------------ */

function vmState(v) {
    if (v.state === "encrypted")
        return el("span", {}, label("Encrypted", "green"), " by ", el("strong", {}, v.provider));
    if (v.state === "locked")
        return el("span", {}, label("Locked", "red"), " ", v.reason);
    if (v.state === "error")
        return el("span", {}, label("Error", "red"), " ", v.reason);
    return label("Plain");
}

function providerSelect(id, withDefault) {
    const sel = el("select", { id });
    if (withDefault)
        sel.append(el("option", { value: "" }, "the host's default"));
    for (const p of providers.filter(x => x.active))
        sel.append(el("option", { value: p.name }, p.name));
    return sel;
}

function showProgress(step) {
    const pct = step.total ? Math.round(100 * step.done / step.total) : 100;
    $("progress").hidden = false;
    $("progress-label").textContent = `${step.op} ${step.vm || ""}: ${step.step} (${step.done}/${step.total})`;
    $("progress-bar").style.width = pct + "%";
}

/* Runs a long VM verb with its progress shown; resolves to the notice:
 * `done(result)`, or, when nkpctl found an interrupted run of the same
 * operation and finished that (nothing else done), that it did. */
async function longOp(args, done) {
    try {
        const r = await nkpctlWithProgress(args, showProgress);
        if (r && r.finished)
            return `VM '${r.name}': finished the interrupted ${r.finished}.`;
        return done(r);
    } finally {
        $("progress").hidden = true;
    }
}

function encryptVm(v) {
    const sel = providerSelect("encrypt-provider", true);
    openDialog(`Encrypt VM '${v.name}'`, [
        el("p", {}, "The vTPM state and every qcow2 disk are encrypted under keys of the provider (the VM must be shut off)."),
        field("Provider", sel),
    ], "Encrypt", async () => {
        const args = ["vm", "encrypt", v.name];
        if (sel.value)
            args.push("--provider", sel.value);
        return longOp(args, r => `VM '${v.name}' is encrypted by provider '${r.provider}'.`);
    });
}

function decryptVm(v) {
    openDialog(`Decrypt VM '${v.name}'?`, [
        el("p", {}, `Its vTPM state and disks are written back in clear; provider '${v.provider}' no longer protects it.`),
    ], "Decrypt", async () => {
        return longOp(["vm", "decrypt", v.name], () => `VM '${v.name}' is no longer encrypted.`);
    }, true);
}

function rekeyVm(v) {
    const sel = providerSelect("rekey-provider", true);
    openDialog(`Rekey VM '${v.name}'`, [
        el("p", {}, "Shallow rekey: a new key-encryption key from the provider; the data keys stay. Works on a running VM."),
        field("Provider", sel),
    ], "Rekey", async () => {
        const args = ["vm", "rekey", v.name];
        if (sel.value)
            args.push("--provider", sel.value);
        const r = await nkpctl(args);
        return `VM '${v.name}' is rekeyed to provider '${r.provider}'.`;
    });
}

function deepRekeyVm(v) {
    const sel = providerSelect("deep-provider", true);
    openDialog(`Deep rekey of VM '${v.name}'?`, [
        el("p", {}, "New data keys: the vTPM state and every disk are copied and re-encrypted. The VM must be shut off; a full copy of its disks must fit."),
        field("Provider", sel),
    ], "Deep rekey", async () => {
        const args = ["vm", "rekey", v.name, "--deep"];
        if (sel.value)
            args.push("--provider", sel.value);
        return longOp(args, r => `VM '${v.name}' has new data keys from provider '${r.provider}'.`);
    }, true);
}

function renderVms(vms) {
    $("vms").tBodies[0].replaceChildren(...vms.map(v => {
        const actions = el("td", { class: "actions" });
        if (v.state === "plain")
            actions.append(button("Encrypt", () => encryptVm(v)));
        if (v.state === "encrypted") {
            actions.append(button("Rekey", () => rekeyVm(v)));
            actions.append(button("Deep rekey", () => deepRekeyVm(v)));
            actions.append(button("Decrypt", () => decryptVm(v)));
        }
        if (v.running)
            for (const b of actions.querySelectorAll('[data-action="Encrypt"], [data-action="Decrypt"], [data-action="Deep rekey"]')) {
                b.disabled = true;
                b.title = "Shut the VM off first";
            }
        const pending = v.pending
            ? el("div", { class: "muted" }, `'${v.pending.op}' ${v.pending.in_progress ? "in progress" : "interrupted (phase " + v.pending.phase + "): run it again or start the VM"}`)
            : null;
        return el("tr", { "data-vm": v.name },
            el("td", {}, el("strong", {}, v.name)),
            el("td", { "data-field": "state" }, vmState(v), pending),
            el("td", { class: "nowrap" }, v.running ? "running" : "shut off"),
            el("td", {}, v.objects.join(", ")),
            actions);
    }));
}

/* ---- refresh ------------------------------------------------------------------- */

async function refresh() {
    try {
        const [list, alarms, host] = await Promise.all([
            nkpctl(["provider", "list"]), nkpctl(["alarms"]), nkpctl(["host", "status"])]);
        await Promise.all(list.map(async p => {
            try {
                p.usage = (await nkpctl(["provider", "usage", p.name])).vms;
            } catch (ex) {
                p.usage = [];
                p.usageError = errorText(ex);
            }
        }));
        providers = list;
        renderProviders();
        renderAlarms(alarms);
        renderHost(host);
    } catch (ex) {
        showError(errorText(ex));
    }
    try {
        renderVms(await nkpctl(["vm", "list"]));
        $("vms-note").hidden = true;
    } catch (ex) {
        renderVms([]);
        $("vms-note").textContent = errorText(ex);
        $("vms-note").hidden = false;
    }
    document.body.dataset.loaded = "yes";
}

document.addEventListener("DOMContentLoaded", () => {
    $("refresh").addEventListener("click", () => { showNotice(""); refresh(); });
    $("create").addEventListener("click", createProvider);
    $("restore").addEventListener("click", restoreProvider);
    $("host-unlock").addEventListener("click", hostUnlock);
    $("error-close").addEventListener("click", () => { $("error").hidden = true; });
    $("dialog-form").addEventListener("submit", submitDialog);
    $("dialog-cancel").addEventListener("click", closeDialog);
    cockpit.transport.wait(refresh);
});
