// Two browser tabs join the same chat room on a running wshost; one sends, the other must
// show the message. Usage: node chat.mjs http://127.0.0.1:PORT SCREENSHOT.png
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.error("usage: node chat.mjs BASE_URL SCREENSHOT.png");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  // Over https (a self-signed certificate): the page loads over HTTP/2 and its WebSockets can
  // share that connection (RFC 8441).
  const context = await browser.newContext({
    viewport: { width: 760, height: 620 },
    ignoreHTTPSErrors: base.startsWith("https:"),
  });
  const join = async (name) => {
    const page = await context.newPage();
    await page.goto(`${base}/chat/`);
    await page.fill("#room", "demo");
    await page.fill("#name", name);
    await page.click("#join-btn");
    await page.waitForSelector("#status:has-text('in room demo')");
    return page;
  };
  const ann = await join("Ann");
  const bob = await join("Bob");
  await ann.waitForSelector("#log li:has-text('* Bob joined')");
  await ann.fill("#text", "hello from Ann's tab");
  await ann.click("#send");
  await bob.waitForSelector("#log li:has-text(\"Ann: hello from Ann's tab\")");
  await bob.fill("#text", "hi Ann, Bob here");
  await bob.click("#send");
  await ann.waitForSelector("#log li:has-text('Bob: hi Ann, Bob here')");
  await bob.waitForSelector("#log li:has-text('Bob: hi Ann, Bob here')");
  await bob.screenshot({ path: screenshot });
  console.log("browser chat ok");
} finally {
  await browser.close();
}
