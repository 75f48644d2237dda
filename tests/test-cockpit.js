// SPDX-License-Identifier: LGPL-2.1-or-later
// The browser half of tests/test-cockpit.sh: drives the Key providers page
// in Cockpit's shell with Debian's Chromium (started by the shell script,
// reached over CDP) through playwright-core.  Prints one line per check,
// "PASS what" or "FAIL what", and "NOTE text"; the shell script turns them
// into TAP.  Stops at the first failure (each step builds on the one before).
//
// Environment: tests/lib/cockpit.sh's (see tests/lib/cockpit-driver.js), and
// NKP_TOP (the test's temp dir: current-root, libvirt.xml, roots), NKPCTL
// (the real nkpctl).
"use strict";

const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");
const { pass, fail, until, openPage, submitExpectingError, submitAndClose, run } =
    require("./lib/cockpit-driver.js");

const TOP = process.env.NKP_TOP;
const NKPCTL = process.env.NKPCTL;
const PASSWORD = "correct horse battery staple";

// nkpctl on a root of the test, as the shell would run it (not through the page).
function nkpctl(root, args, input) {
    return execFileSync(NKPCTL, ["--root", root, "--connect", `test://${TOP}/libvirt.xml`].concat(args),
                        { input, encoding: "utf8", stdio: ["pipe", "pipe", "pipe"] });
}

function useRoot(root) {
    fs.writeFileSync(path.join(TOP, "current-root"), root + "\n");
}

// libvirt's test driver, read by every nkpctl run: a plain VM, and web01
// whose keysafe names `provider` (when given).
function writeVms(provider) {
    let keysafe = "";
    if (provider)
        keysafe = `<metadata>
      <nkp:keysafe xmlns:nkp="https://nkp.invalid/xmlns/keysafe/1" version="1">
        <nkp:vm uuid="6695eb01-f6a4-8304-79aa-97f2502e193f"/>
        <nkp:provider name="${provider.name}" key-id="${provider.key_id}" fingerprint="${provider.fingerprint}"/>
        <nkp:kek salt="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="/>
      </nkp:keysafe>
    </metadata>`;
    fs.writeFileSync(path.join(TOP, "libvirt.xml"), `<node>
  <domain type='test'>
    <name>web01</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    ${keysafe}
  </domain>
  <domain type='test'>
    <name>db02</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e1940</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>
  </domain>
</node>
`);
}

async function main() {
    const rootA = path.join(TOP, "root-a"), rootB = path.join(TOP, "root-b"), rootC = path.join(TOP, "root-c");
    useRoot(rootA);
    writeVms(null);

    const { browser, f, page, screenshot, errors } = await openPage("");
    await until("the VM list comes from libvirt (web01, db02)",
                async () => await f.locator('tr[data-vm="web01"]').count() === 1 &&
                            await f.locator('tr[data-vm="db02"]').count() === 1);
    pass("the VM list shows libvirt's VMs, plain");
    await screenshot("empty");

    // ---- create: not backed up, and its alarm -------------------------------
    await f.locator("#create").click();
    await f.locator("#create-name").fill("bad name!");
    const bad = await submitExpectingError(f, "a bad name is refused with nkpctl's line", "nkpctl:");
    pass("a bad provider name: nkpctl's own error in the dialog: " + bad.split("\n")[0]);
    // Require a TPM on a host without one: nkpctl refuses, nothing created.
    await f.locator("#create-name").fill("tpmonly");
    await f.locator("#create-require-tpm").check();
    const noTpm = await submitExpectingError(f, "require-TPM without a TPM is refused", "requires a TPM 2.0");
    if (nkpctl(rootA, ["provider", "list"]).includes("tpmonly"))
        fail("nothing created with require-TPM on a host without a TPM");
    pass("create with 'Require a TPM 2.0' on a host without one: refused, nkpctl's line shown: " + noTpm);
    await screenshot("require-tpm-refused");
    await f.locator("#create-require-tpm").uncheck();
    await f.locator("#create-name").fill("prod");
    await submitAndClose(f, "create provider 'prod'");
    const row = f.locator('tr[data-provider="prod"]');
    await until("prod is listed", async () => await row.count() === 1);
    await until("prod shows 'Not backed up'",
                async () => (await row.locator('[data-field="backed_up"]').innerText()).includes("Not backed up"));
    pass("created 'prod': listed, 'Not backed up'");
    const inactive = f.locator('li[data-kind="provider-inactive"]');
    await until("the provider-inactive alarm names prod, with the fix",
                async () => (await inactive.innerText()).includes("nkpctl provider backup prod"));
    pass("alarm provider-inactive for prod, with its fix");
    const prod = JSON.parse(nkpctl(rootA, ["--json", "provider", "show", "prod"]));
    if (!(await row.innerText()).includes(prod.key_id))
        fail("the row shows prod's key id");
    pass("the row shows the key id nkpctl reports");
    await screenshot("created-not-backed-up");

    // Set default is refused before the backup: nkpctl's line shown.
    await row.locator('[data-action="Set default"]').click();
    await until("set-default of an inactive provider: nkpctl's refusal shown",
                async () => await f.locator("#error").isVisible() &&
                            (await f.locator("#error-text").innerText()).includes("nkpctl:"));
    pass("set-default before a backup: refused, nkpctl's line shown: " +
         (await f.locator("#error-text").innerText()));
    await screenshot("set-default-refused");
    await f.locator("#error-close").click();

    // ---- back up: passwords twice, the .p12 downloaded ---------------------------
    await row.locator('[data-action="Back up"]').click();
    await f.locator("#backup-password").fill(PASSWORD);
    await f.locator("#backup-password2").fill(PASSWORD + "x");
    await submitExpectingError(f, "two different passwords are refused", "differ");
    pass("backup with two different passwords: refused in the page");
    await f.locator("#backup-password2").fill(PASSWORD);
    const downloadWait = page.waitForEvent("download", { timeout: 30000 });
    await submitAndClose(f, "back up prod");
    const download = await downloadWait;
    const p12 = path.join(TOP, "prod.p12");
    await download.saveAs(p12);
    if (download.suggestedFilename() !== "prod.p12")
        fail("the download is named prod.p12, not " + download.suggestedFilename());
    pass(`the browser downloaded prod.p12 (${fs.statSync(p12).size} bytes)`);
    await until("prod shows 'Backed up'",
                async () => (await row.locator('[data-field="backed_up"]').innerText()).includes("Backed up") &&
                            !(await row.locator('[data-field="backed_up"]').innerText()).includes("Not"));
    await until("the provider-inactive alarm is gone", async () => await inactive.count() === 0);
    pass("prod 'Backed up', its alarm gone");
    const left = fs.readdirSync("/run").filter(n => n.startsWith("nkp-cockpit."));
    if (left.length)
        fail("the backup's temp directory is removed: " + left.join(", "));
    pass("no temp directory left in /run");
    // The downloaded file restores with nkpctl and its password, on another root.
    const restored = JSON.parse(nkpctl(rootC, ["--json", "provider", "restore", p12, "--password-stdin"],
                                       PASSWORD + "\n"));
    if (restored.key_id !== prod.key_id || restored.fingerprint !== prod.fingerprint)
        fail("the downloaded .p12 restores prod (same key id and fingerprint)");
    pass("nkpctl provider restore of the downloaded file: same key id and fingerprint");
    await screenshot("backed-up");

    // ---- set default ------------------------------------------------------------------
    await row.locator('[data-action="Set default"]').click();
    await until("prod shows 'Default'",
                async () => (await row.locator('[data-field="default"]').innerText()).includes("Default"));
    if (!JSON.parse(nkpctl(rootA, ["--json", "provider", "show", "prod"])).default)
        fail("nkpctl says prod is the default");
    pass("set default: the row says Default, and so does nkpctl");
    await screenshot("default");

    // ---- delete refused while a VM uses it --------------------------------------------
    writeVms(prod);
    await f.locator("#refresh").click();
    await until("prod's VMs column names web01",
                async () => (await row.locator('[data-field="usage"]').innerText()).includes("web01"));
    pass("the VMs column shows web01 using prod");
    await until("web01 shows 'Encrypted by prod'",
                async () => (await f.locator('tr[data-vm="web01"] [data-field="state"]').innerText()).includes("prod"));
    pass("the VM list shows web01 encrypted by prod");
    await row.locator('[data-action="Delete"]').click();
    const confirm = await f.locator("#dialog-body").innerText();
    if (!confirm.includes("web01"))
        fail("the delete confirmation names the VM using prod: " + confirm);
    pass("delete asks for confirmation, naming web01");
    await screenshot("delete-confirm");
    const refusal = await submitExpectingError(f, "delete of a used provider is refused, naming web01",
                                               "protects the defined VM 'web01'");
    pass("delete refused while used, nkpctl's line shown: " + refusal);
    await screenshot("delete-refused");
    await f.locator("#dialog-cancel").click();
    if (!nkpctl(rootA, ["provider", "list"]).includes("prod"))
        fail("prod is still in the store after the refused delete");
    pass("prod is still in the store");

    // ---- restore on a second root: wrong password, then the right one ----------------------
    useRoot(rootB);
    writeVms(null);
    await f.locator("#refresh").click();
    await until("root B has no providers", async () => await f.locator("#no-providers").isVisible());
    await f.locator("#restore").click();
    await f.locator("#restore-file").setInputFiles(p12);
    await f.locator("#restore-password").fill("wrong password");
    const wrong = await submitExpectingError(f, "a wrong password: nkpctl's error shown", "nkpctl:");
    pass("restore with a wrong password: nkpctl's line in the dialog: " + wrong);
    await screenshot("restore-wrong-password");
    if (nkpctl(rootB, ["provider", "list"]).includes("prod"))
        fail("nothing restored with the wrong password");
    pass("nothing restored with the wrong password");
    await f.locator("#restore-password").fill(PASSWORD);
    await submitAndClose(f, "restore prod from the uploaded file");
    await until("prod restored on root B", async () => await row.count() === 1);
    const prodB = JSON.parse(nkpctl(rootB, ["--json", "provider", "show", "prod"]));
    if (prodB.key_id !== prod.key_id || prodB.default)
        fail("the restored prod has prod's key id and is not the default");
    if (!(await row.innerText()).includes(prod.key_id))
        fail("the restored row shows prod's key id");
    pass("restore from an uploaded .p12: prod back with its key id, not the default");
    await screenshot("restored");

    // ---- host unlock: nkpctl's answer shown ---------------------------------------------
    await f.locator("#host-unlock").click();
    await until("host unlock answers", async () => await f.locator("#notice").isVisible() ||
                                                     await f.locator("#error").isVisible());
    pass("host unlock: " + (await f.locator("#notice").isVisible() ? await f.locator("#notice").innerText()
                                                                  : await f.locator("#error-text").innerText()));

    // The README's picture: root A, prod default and used, alarm-free.
    useRoot(rootA);
    writeVms(prod);
    await f.locator("#refresh").click();
    await until("back on root A", async () =>
        (await row.locator('[data-field="default"]').innerText()).includes("Default") &&
        (await row.locator('[data-field="usage"]').innerText()).includes("web01"));
    await f.locator("#notice").evaluate(n => { n.hidden = true; });
    await screenshot("overview");

    if (errors.length)
        fail("no script errors in the page: " + errors.join("; "));
    pass("no script errors in the page");
    await browser.close();
}

run(main);
