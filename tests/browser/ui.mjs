// The web page in a real browser (Debian's chromium through playwright-core), against a
// daemon tests/it/ui.rs started with real deliveries. Every step that fails prints why
// and the process exits 1. Screenshots of each page go to $SHOTS.
//
// Environment: BASE (the daemon's URL), ADMIN and AFF42 (tokens), DEAD (a dead delivery of
// affiliate 42's postback), OTHER (a delivery of affiliate 7's), SHOTS (a directory).
import { chromium } from "playwright-core";

const { BASE, ADMIN, AFF42, DEAD, OTHER, SHOTS } = process.env;
const failures = [];
function check(ok, what) {
  if (!ok) failures.push(what);
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  // --- The admin ---------------------------------------------------------------------
  const admin = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await admin.newPage();
  await page.goto(`${BASE}/ui/deliveries`);
  check(page.url().endsWith("/ui/login"), "an anonymous visit is sent to the sign-in page");
  await page.fill("input[name=token]", "not-the-token-at-all");
  await page.click("button[type=submit]");
  check((await page.textContent("body")).includes("Wrong token"), "a wrong token is refused with a reason");
  await page.screenshot({ path: `${SHOTS}/login.png`, fullPage: true });
  await page.fill("input[name=token]", ADMIN);
  await page.click("button[type=submit]");
  await page.waitForSelector("table.deliveries");
  check(page.url().endsWith("/ui/deliveries"), "signing in leads to the deliveries");
  const cookies = await admin.cookies();
  const session = cookies.find((c) => c.name === "postbackd_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  const allRows = await page.$$eval("table.deliveries tbody tr", (rs) => rs.length);
  check(allRows >= 6, `the admin sees every delivery (${allRows} rows)`);
  await page.screenshot({ path: `${SHOTS}/deliveries.png`, fullPage: true });

  // Filter by postback: the filter lives in the URL, every row is that postback's.
  await page.selectOption("select[name=postback]", "aff7");
  await page.click("form.filters button[type=submit]");
  await page.waitForSelector("table.deliveries");
  check(page.url().includes("postback=aff7"), "the postback filter is in the URL");
  const postbacks = await page.$$eval("table.deliveries tbody tr td:nth-child(3)", (tds) => tds.map((t) => t.textContent.trim()));
  check(postbacks.length > 0 && postbacks.every((p) => p === "aff7"), `filtered by postback: ${postbacks}`);
  await page.screenshot({ path: `${SHOTS}/deliveries-filtered.png`, fullPage: true });

  // Search by transaction id, then by click id.
  await page.goto(`${BASE}/ui/deliveries?q=T4`);
  const tx = await page.$$eval("table.deliveries tbody tr td:nth-child(6)", (tds) => tds.map((t) => t.textContent.trim()));
  check(tx.length > 0 && tx.every((t) => t === "T4"), `searched by transaction id: ${tx}`);
  await page.goto(`${BASE}/ui/deliveries?q=c5`);
  const clicks = await page.$$eval("table.deliveries tbody tr td:nth-child(7)", (tds) => tds.map((t) => t.textContent.trim()));
  check(clicks.length > 0 && clicks.every((c) => c === "c5"), `searched by click id: ${clicks}`);

  // Open the dead delivery and retry it: a new attempt appears.
  await page.goto(`${BASE}/ui/deliveries`);
  await page.click(`a[href="/ui/deliveries/${DEAD}"]`);
  await page.waitForSelector("section.attempt");
  check((await page.textContent("h1")).includes("dead"), "the dead delivery says it is dead");
  const before = await page.$$eval("section.attempt", (s) => s.length);
  check((await page.textContent("body")).includes("400"), "the attempt shows the answer's status");
  const history = await page.$$eval("table.history tbody tr", (rs) => rs.map((r) => r.textContent.replace(/\s+/g, " ")));
  check(history.length === 1 && history[0].includes("approved") && history[0].includes("aff42"), `the delivery shows its conversion's history: ${history}`);
  await page.screenshot({ path: `${SHOTS}/delivery-dead.png`, fullPage: true });
  await page.click("form.retry button");
  await page.waitForSelector("p.notice");
  let after = before;
  for (let i = 0; i < 40 && after <= before; i++) {
    await page.waitForTimeout(250);
    await page.reload();
    after = await page.$$eval("section.attempt", (s) => s.length);
  }
  check(after === before + 1, `retry made a new attempt (${before} -> ${after})`);
  check((await page.textContent("h1")).includes("delivered"), "after the retry it is delivered");
  await page.screenshot({ path: `${SHOTS}/delivery-retried.png`, fullPage: true });

  await page.goto(`${BASE}/ui/incoming`);
  const refused = await page.$$eval("table.refused tbody tr", (rs) => rs.map((r) => r.textContent.replace(/\s+/g, " ")));
  check(refused.some((r) => r.includes("bad_secret") && r.includes("keitaro") && r.includes("token=***")), `a wrong secret is on the incoming page with its reason, the secret masked: ${refused}`);
  check(refused.some((r) => r.includes("unknown_source") && r.includes("nosuchsource")), `an unknown source is on the incoming page: ${refused}`);
  check(!refused.some((r) => r.includes("not-the-secret")), "the refused secret itself is never shown");
  const received = await page.$$eval("table.events tbody tr", (rs) => rs.map((r) => r.textContent.replace(/\s+/g, " ")));
  check(received.some((r) => r.includes("T1") && r.includes("aff42")), `a received event shows what it matched: ${received.slice(0, 2)}`);
  await page.screenshot({ path: `${SHOTS}/incoming.png`, fullPage: true });

  await page.goto(`${BASE}/ui/rules`);
  const rules = await page.$$eval("table.rules tbody tr", (rs) => rs.map((r) => r.textContent.replace(/\s+/g, " ")));
  check(rules.length === 2 && rules.some((r) => r.includes("aff42") && r.includes("rules.yaml:5")), `the rules page lists each postback with its file and line: ${rules}`);
  const day = await page.$$eval("table.rules tbody tr td.day small", (ts) => ts.map((t) => t.textContent.trim()));
  check(day.some((d) => d.startsWith("3: 3 delivered")), `each postback's last 24 hours by outcome: ${day}`);
  await page.screenshot({ path: `${SHOTS}/rules.png`, fullPage: true });

  await page.goto(`${BASE}/ui/health`);
  check((await page.textContent("main")).includes("Ready"), "the health page says ready");
  await page.screenshot({ path: `${SHOTS}/health.png`, fullPage: true });

  // A form posted without the session's CSRF token is refused (a cross-site request
  // would not carry the cookie at all: SameSite=Strict).
  const forged = await page.evaluate(async (id) => {
    const r = await fetch(`/ui/deliveries/${id}/retry`, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: "csrf=guess" });
    return r.status;
  }, DEAD);
  check(forged === 403, `a retry without the page's CSRF token is refused (${forged})`);

  // --- An affiliate ------------------------------------------------------------------
  const aff = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const apage = await aff.newPage();
  await apage.goto(`${BASE}/ui/login`);
  await apage.fill("input[name=token]", AFF42);
  await apage.click("button[type=submit]");
  await apage.waitForSelector("table.deliveries");
  const own = await apage.$$eval("table.deliveries tbody tr td:nth-child(3)", (tds) => tds.map((t) => t.textContent.trim()));
  check(own.length > 0 && own.every((p) => p === "aff42"), `the affiliate sees its own postbacks only: ${own}`);
  const options = await apage.$$eval("select[name=postback] option", (os) => os.map((o) => o.value).filter((v) => v));
  check(options.length === 1 && options[0] === "aff42", `the affiliate's postback filter offers its own only: ${options}`);
  await apage.goto(`${BASE}/ui/deliveries?postback=aff7`);
  const forced = await apage.$$eval("table.deliveries tbody tr td:nth-child(3)", (tds) => tds.map((t) => t.textContent.trim()).filter((t) => t !== "No delivery matches."));
  check(forced.length === 0 || forced.every((p) => p === "aff42"), `another's postback in the URL shows nothing: ${forced}`);
  await apage.goto(`${BASE}/ui/incoming`);
  check((await apage.$("table.refused")) === null, "an affiliate does not see refused webhooks");
  const aevents = await apage.$$eval("table.events tbody tr td:nth-child(7)", (tds) => tds.map((t) => t.textContent.trim()));
  check(aevents.length === 3 && aevents.every((a) => a === "42"), `the affiliate's incoming page shows its own events: ${aevents}`);
  await apage.goto(`${BASE}/ui/rules`);
  const arules = await apage.$$eval("table.rules tbody tr td:first-child a", (as) => as.map((a) => a.textContent.trim()));
  check(arules.length === 1 && arules[0] === "aff42", `the affiliate's rules page shows its own postback only: ${arules}`);
  const byId = await apage.goto(`${BASE}/ui/deliveries/${OTHER}`);
  check(byId.status() === 404, `another affiliate's delivery by id is not found (${byId.status()})`);
  await apage.goto(`${BASE}/ui/deliveries`);
  await apage.screenshot({ path: `${SHOTS}/affiliate.png`, fullPage: true });
  const retryOther = await apage.evaluate(async (id) => {
    const r = await fetch(`/ui/deliveries/${id}/retry`, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: "csrf=x" });
    return r.status;
  }, OTHER);
  check(retryOther === 403, `the affiliate cannot retry another's delivery (${retryOther})`);
  const ownPage = await apage.goto(`${BASE}/ui/deliveries/${DEAD}`);
  check(ownPage.status() === 200 && (await apage.$("form.retry")) === null, "an affiliate gets no Retry button");
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(`${failures.length} check(s) failed:\n${failures.join("\n")}`);
  process.exit(1);
}
console.log("all checks passed");
