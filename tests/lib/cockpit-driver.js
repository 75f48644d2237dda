// SPDX-License-Identifier: LGPL-2.1-or-later
// What the page's browser drivers share (tests/test-cockpit.js,
// integration/t-cockpit.js): output lines for tests/lib/cockpit.sh
// ("PASS what", "FAIL what", "NOTE text"), polling, screenshots, and the
// page opened in Cockpit's shell in Chromium (started by cockpit.sh,
// reached over CDP; the environment names it).
"use strict";

const path = require("path");
const { chromium } = require(process.env.NKP_PLAYWRIGHT);

class Failure extends Error {}

function pass(what) { console.log("PASS " + what); }
function note(what) { console.log("NOTE " + what); }
function fail(what) { throw new Failure(what); }

// Polls fn() (async, truthy when done) for up to `ms`; fails with `what`.
async function until(what, fn, ms = 20000) {
    const end = Date.now() + ms;
    let last;
    for (;;) {
        try {
            last = await fn();
            if (last)
                return last;
        } catch (ex) {
            if (ex instanceof Failure)
                throw ex;
            last = ex.message;
        }
        if (Date.now() > end)
            fail(`${what} (timed out; last: ${last})`);
        await new Promise(r => setTimeout(r, 200));
    }
}

// The shell at /nkp, the page's frame loaded.  Returns { browser, page, f
// (the page's frame), screenshot(name), errors (the page's script errors) }.
async function openPage(prefix) {
    const browser = await chromium.connectOverCDP(`http://127.0.0.1:${process.env.NKP_CDP_PORT}`);
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 }, acceptDownloads: true });
    context.setDefaultTimeout(20000);
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", e => errors.push(e.message));
    let shot = 0;
    async function screenshot(name) {
        const file = path.join(process.env.NKP_ARTIFACTS, `${prefix}${String(++shot).padStart(2, "0")}-${name}.png`);
        await page.screenshot({ path: file });
        note("screenshot " + file);
    }
    await page.goto(process.env.NKP_COCKPIT_URL + "/nkp");
    const f = page.frameLocator('iframe[name="cockpit1:localhost/nkp"]');
    await until("the page loads in Cockpit's shell",
                async () => (await f.locator("body").getAttribute("data-loaded")) === "yes", 30000);
    await until("the shell's menu has 'Key providers'",
                async () => (await page.locator("#host-apps").innerText()).includes("Key providers"));
    pass("the page loads in Cockpit's shell, listed as 'Key providers'");
    return { browser, page, f, screenshot, errors };
}

// The dialog: submit and expect nkpctl's (or the page's) error in it, or
// submit and expect it to close.
async function submitExpectingError(f, what, needle, ms) {
    await f.locator("#dialog-ok").click();
    await until(what, async () => await f.locator("#dialog-error").isVisible() &&
                                  (await f.locator("#dialog-error").innerText()).includes(needle), ms);
    return f.locator("#dialog-error").innerText();
}

async function submitAndClose(f, what, ms) {
    await f.locator("#dialog-ok").click();
    await until(what, async () => {
        if (await f.locator("#dialog-error").isVisible())
            fail(`${what}: the dialog says: ${await f.locator("#dialog-error").innerText()}`);
        return await f.locator("#dialog").isHidden();
    }, ms);
}

// Runs main(); a failure becomes one FAIL line and exit 1.
function run(main) {
    main().then(() => process.exit(0), ex => {
        const text = ex instanceof Failure ? ex.message : "driver error: " + (ex.stack || ex);
        console.log("FAIL " + text.replace(/\n/g, " | "));
        process.exit(1);
    });
}

module.exports = { Failure, pass, note, fail, until, openPage, submitExpectingError, submitAndClose, run };
