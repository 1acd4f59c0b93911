// Drives headless Chromium (Debian's, through playwright-core) against a
// live Shoal dashboard or a performance report file, and prints what it saw
// as JSON for the Python tests to judge. Screenshots go to OUTDIR.
//
//   node dashboard.mjs live   URL_WITH_TOKEN OUTDIR
//     (LOGIN_URL set: opened first, as a user logged in to Jupyter is,
//     before the dashboard is reached through its proxy)
//   node dashboard.mjs report FILE.html      OUTDIR
//   node dashboard.mjs hold   URL_WITH_TOKEN SECONDS   (keeps the page open: benchmarks)
import { chromium } from "playwright-core";
import { join } from "node:path";

const [mode, target, out] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
// Chromium must not try the network (this machine's is closed) or set up
// what a headless test does not need.
const args = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];  // (playwright gives each launch a fresh profile directory)
const browser = await chromium.launch({ executablePath, headless: true, args, handleSIGTERM: false });
const result = { mode, errors: [] };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => result.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") result.errors.push(m.text()); });

  if (mode === "live") {
    const base = target.split("?")[0];
    // Without the token (or, behind a proxy, without its login): refused.
    const anon = await context.request.get(base + "api/status", { headers: { cookie: "" }, maxRedirects: 0 });
    result.anonymous_status = anon.status();
    if (process.env.LOGIN_URL) {
      const login = await page.goto(process.env.LOGIN_URL);
      result.login_status = login.status();
    }
    result.page_status = (await page.goto(target)).status();
    await page.waitForFunction(() => document.getElementById("connection").textContent === "live", null, { timeout: 15000 });
    await page.waitForFunction(() => Number(document.getElementById("task-stream").dataset.tasks || 0) > 0, null, { timeout: 15000 });
    const finished = async () => Number((await page.textContent("#counter-finished")).replace(/[^0-9]/g, ""));
    const f0 = await finished();
    await sleep(2000);
    const f1 = await finished();
    result.finished = [f0, f1];
    result.stream = await page.evaluate(() => ({ ...document.getElementById("task-stream").dataset }));
    result.progress_groups = await page.$$eval("#progress .group-row", (rows) => rows.map((r) => r.dataset.group));
    await page.screenshot({ path: join(out, "status.png"), fullPage: true });

    // Stop following, click an erred task's block: the detail panel shows its traceback.
    // Zoom in on it with the wheel first, as a person would.
    await page.click("#stream-follow");
    const errorPoint = () => page.evaluate(() => {
      const s = window.__shoal.state.stream;
      for (let i = s.length - 1; i >= 0; i--) {
        if (s[i][7] === 1) { const p = window.__shoal.pointOf(s[i]); if (p) return p; }
      }
      return null;
    });
    let point = await errorPoint();
    for (let k = 0; point && k < 10; k++) {
      await page.mouse.move(point.x, point.y);
      await page.mouse.wheel(0, -100);
      await sleep(50);
      point = await errorPoint();
    }
    if (point) {
      await page.mouse.click(point.x, point.y);
      await page.waitForSelector("#task-detail:not([hidden]) pre.traceback", { timeout: 5000 }).catch(() => {});
      result.detail = await page.textContent("#task-detail");
      await page.screenshot({ path: join(out, "task-detail.png") });
      await page.click("#detail-close");
    }

    await page.click("button[data-tab=workers]");
    await page.waitForSelector("#workers-table tbody tr");
    const workersText = () => page.textContent("#workers-table tbody");
    result.worker_rows = await page.$$eval("#workers-table tbody tr", (rows) => rows.map((r) => r.dataset.worker));
    const w0 = await workersText();
    await sleep(2500);
    result.workers_changed = w0 !== (await workersText());
    await page.screenshot({ path: join(out, "workers.png"), fullPage: true });

    await page.click("button[data-tab=graph]");
    await page.waitForSelector("#graph .graph-node", { timeout: 10000 });
    result.graph_nodes = await page.$$eval("#graph .graph-node", (n) => n.map((g) => g.dataset.group));
    await page.screenshot({ path: join(out, "graph.png"), fullPage: true });

    await page.click("button[data-tab=profile]");
    await page.waitForFunction(() => Number(document.getElementById("flame").dataset.frames || 0) > 0, null, { timeout: 15000 });
    result.flame_frames = await page.$$eval("#flame .frame", (f) => f.map((x) => x.textContent));
    await page.screenshot({ path: join(out, "profile.png"), fullPage: true });

    await page.click("button[data-tab=logs]");
    await page.waitForFunction(() => document.getElementById("logs").textContent.length > 0, null, { timeout: 10000 });
    await sleep(500);
    result.logs = await page.textContent("#logs");
    await page.screenshot({ path: join(out, "logs.png"), fullPage: true });
  } else if (mode === "report") {
    // Offline: any request that leaves the file fails the test.
    result.requests = [];
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith("file:")) return route.continue();
      result.requests.push(url);
      return route.abort();
    });
    await context.setOffline(true);
    await page.goto("file://" + target);
    await page.waitForSelector("#summary-table tbody tr", { timeout: 10000 });
    result.summary = await page.$$eval("#summary-table tbody tr", (rows) => rows.map((r) => [...r.children].map((c) => c.textContent)));
    result.stream = await page.evaluate(() => ({ ...document.getElementById("task-stream").dataset }));
    result.connection = await page.textContent("#connection");
    await page.screenshot({ path: join(out, "report-status.png"), fullPage: true });
    await page.click("button[data-tab=memory]");
    result.memory_series = await page.evaluate(() => Number(document.getElementById("memory-chart").dataset.series || 0));
    await page.screenshot({ path: join(out, "report-memory.png"), fullPage: true });
    await page.click("button[data-tab=profile]");
    result.flame_frames = await page.$$eval("#flame .frame", (f) => f.length);
    await page.screenshot({ path: join(out, "report-profile.png"), fullPage: true });
  } else if (mode === "hold") {
    // Keeps the Status page open; on SIGTERM (or after SECONDS) prints how
    // long its redraws took.
    await page.goto(target);
    await page.waitForFunction(() => document.getElementById("connection").textContent === "live", null, { timeout: 15000 });
    console.error("dashboard open");
    await new Promise((resolve) => {
      setTimeout(resolve, Number(out) * 1000);
      process.on("SIGTERM", resolve);
    });
    Object.assign(result, await page.evaluate(() => {
      const s = window.__shoal.state;
      return { renders: s.renders, render_max_ms: s.renderMaxMs, blocks: s.stream.length, finished: s.counters.finished };
    }));
  } else {
    throw new Error("mode must be live, report or hold, not " + mode);
  }
} catch (e) {
  result.errors.push("driver: " + (e && e.stack ? e.stack : e));
} finally {
  await browser.close();
}
// Exit once written (a pending timer would keep node alive).
process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
