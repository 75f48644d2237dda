// SPDX-License-Identifier: LGPL-2.1-or-later
// The browser half of integration/t-cockpit.sh: a lab VM encrypted,
// rekeyed, deep-rekeyed and decrypted through the Key providers page, each
// long operation's progress seen in the page, each state checked with the
// lab host's nkpctl and qemu-img too.
// Environment: tests/lib/cockpit.sh's, NKP_LAB_EXEC (runs a command in the
// lab host), NKP_VM (the domain), NKP_VM_DISK (its qcow2, seen from
// outside), NKP_LAB_P1 and NKP_LAB_PW (p1's backup and its password file).
"use strict";

const { execFileSync } = require("child_process");
const { pass, fail, until, openPage, submitAndClose, run } = require("../tests/lib/cockpit-driver.js");

const VM = process.env.NKP_VM;
const OP_MS = 180000; // a LUKS copy under TCG load takes seconds to minutes

function lab(...args) {
    return execFileSync(process.env.NKP_LAB_EXEC, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function vmStatus() {
    return JSON.parse(lab("nkpctl", "--json", "vm", "status", VM));
}

function diskEncrypted() {
    return /encrypted: yes/.test(execFileSync("qemu-img", ["info", "-U", process.env.NKP_VM_DISK], { encoding: "utf8" }));
}

async function main() {
    const { browser, page, f, screenshot, errors } = await openPage("lab-");
    const frame = page.frame({ name: "cockpit1:localhost/nkp" });
    const row = f.locator(`tr[data-vm="${VM}"]`);
    const state = () => row.locator('[data-field="state"]').innerText();
    await until(`${VM} is listed as plain`, async () => (await row.count()) === 1 && (await state()).includes("Plain"));
    pass(`the VM list shows ${VM}, plain, shut off`);
    await screenshot("plain");

    // Every progress line the page shows, recorded as it changes.
    await frame.evaluate(() => {
        window.nkpSteps = [];
        const label = document.getElementById("progress-label");
        new MutationObserver(() => window.nkpSteps.push(label.textContent))
            .observe(label, { childList: true, characterData: true, subtree: true });
    });
    async function stepsSeen() {
        return frame.evaluate(() => window.nkpSteps.splice(0));
    }
    async function shotWhileRunning(name) {
        // Best effort: the picture of the bar, if the step is slow enough.
        try {
            await f.locator("#progress").waitFor({ state: "visible", timeout: 15000 });
            await screenshot(name);
        } catch (ex) { /* too quick to catch: the recorded steps still say */ }
    }

    // ---- encrypt -----------------------------------------------------------------
    await row.locator('[data-action="Encrypt"]').click();
    await f.locator("#dialog-ok").click();
    await shotWhileRunning("encrypt-progress");
    await until("the encrypt dialog closes", async () => {
        if (await f.locator("#dialog-error").isVisible())
            fail("encrypt: " + await f.locator("#dialog-error").innerText());
        return f.locator("#dialog").isHidden();
    }, OP_MS);
    await until(`${VM} shows 'Encrypted by p1'`, async () => /Encrypted\s*by p1/.test(await state()));
    let steps = await stepsSeen();
    if (!steps.some(s => s.includes(`encrypt ${VM}: vda (0/2)`)) ||
        !steps.some(s => s.includes(`encrypt ${VM}: definition (1/2)`)))
        fail("the page showed encrypt's steps: " + JSON.stringify(steps));
    pass("encrypt through the page, progress shown: " + steps.join(" → "));
    let st = vmStatus();
    if (st.state !== "encrypted" || st.provider !== "p1" || !diskEncrypted())
        fail("nkpctl vm status and qemu-img agree: " + JSON.stringify(st));
    pass("nkpctl: encrypted by p1; qemu-img: the qcow2 is encrypted");
    await screenshot("encrypted");

    // ---- shallow rekey to p2 ----------------------------------------------------------
    await row.locator('[data-action="Rekey"]').click();
    await f.locator("#rekey-provider").selectOption("p2");
    await submitAndClose(f, "rekey to p2", OP_MS);
    await until(`${VM} shows 'Encrypted by p2'`, async () => /Encrypted\s*by p2/.test(await state()));
    if (vmStatus().provider !== "p2")
        fail("nkpctl says p2 after the rekey");
    pass("shallow rekey to p2 through the page: the row and nkpctl say p2");

    // ---- deep rekey (confirmed) --------------------------------------------------------
    await row.locator('[data-action="Deep rekey"]').click();
    if (!(await f.locator("#dialog-title").innerText()).includes("Deep rekey"))
        fail("deep rekey asks for confirmation");
    await f.locator("#deep-provider").selectOption("p1");
    await screenshot("deep-rekey-confirm");
    await f.locator("#dialog-ok").click();
    await shotWhileRunning("deep-rekey-progress");
    await until("the deep rekey dialog closes", async () => {
        if (await f.locator("#dialog-error").isVisible())
            fail("deep rekey: " + await f.locator("#dialog-error").innerText());
        return f.locator("#dialog").isHidden();
    }, OP_MS);
    await until(`${VM} shows 'Encrypted by p1'`, async () => /Encrypted\s*by p1/.test(await state()));
    steps = await stepsSeen();
    if (!steps.some(s => s.includes(`rekey-deep ${VM}: vda (0/2)`)))
        fail("the page showed the deep rekey's steps: " + JSON.stringify(steps));
    pass("deep rekey to p1 (confirmed) through the page, progress shown: " + steps.join(" → "));
    st = vmStatus();
    if (st.state !== "encrypted" || st.provider !== "p1" || !diskEncrypted())
        fail("after the deep rekey nkpctl and qemu-img agree: " + JSON.stringify(st));
    pass("nkpctl: encrypted by p1 after the deep rekey");

    // ---- locked: p1 deleted, the host "rebooted" (key cache flushed) -------------------
    lab("nkpctl", "provider", "delete", "p1", "--force");
    lab("nkpctl", "host", "flush-cache");
    let startErr = "";
    try {
        lab("virsh", "-c", "qemu:///system", "start", VM);
    } catch (ex) {
        startErr = String(ex.stderr);
    }
    if (!startErr.includes("nkp"))
        fail("virsh start of the locked VM fails with nkp's line: " + startErr);
    await f.locator("#refresh").click();
    await until(`${VM} shows 'Locked' and why`, async () => /Locked/.test(await state()) && /p1/.test(await state()));
    const locked = f.locator(`li[data-kind="vm-locked"]`);
    await until("the vm-locked alarm names the VM", async () => (await locked.innerText()).includes(VM));
    pass(`p1 deleted, cache flushed, start refused: the page shows ${VM} locked (${(await state()).replace(/\s+/g, " ")}) and the vm-locked alarm (${await locked.innerText()})`);
    await screenshot("locked");
    lab("nkpctl", "provider", "restore", process.env.NKP_LAB_P1, "--password-file", process.env.NKP_LAB_PW);
    lab("nkpctl", "provider", "set-default", "p1");
    await f.locator("#host-unlock").click();
    await until("host unlock: the page says the VM is unlocked",
                async () => (await f.locator("#notice").innerText()).includes(VM));
    await until(`${VM} shows 'Encrypted by p1' again, the alarm gone`,
                async () => /Encrypted\s*by p1/.test(await state()) && await locked.count() === 0);
    pass("p1 restored, 'host unlock' from the page: " + await f.locator("#notice").innerText() +
         " The VM is encrypted by p1 again, the alarm gone");
    await screenshot("unlocked");

    // ---- decrypt (confirmed) -------------------------------------------------------------
    await row.locator('[data-action="Decrypt"]').click();
    if (!(await f.locator("#dialog-title").innerText()).includes("Decrypt"))
        fail("decrypt asks for confirmation");
    await screenshot("decrypt-confirm");
    await submitAndClose(f, "decrypt", OP_MS);
    await until(`${VM} shows 'Plain' again`, async () => (await state()).includes("Plain"));
    steps = await stepsSeen();
    if (!steps.some(s => s.includes(`decrypt ${VM}: vda`)))
        fail("the page showed decrypt's steps: " + JSON.stringify(steps));
    st = vmStatus();
    if (st.state !== "plain" || diskEncrypted())
        fail("after decrypt nkpctl says plain and the qcow2 is plain: " + JSON.stringify(st));
    pass("decrypt (confirmed) through the page: plain in the row, in nkpctl and in qemu-img");
    await screenshot("decrypted");

    if (errors.length)
        fail("no script errors in the page: " + errors.join("; "));
    pass("no script errors in the page");
    await browser.close();
}

run(main);
