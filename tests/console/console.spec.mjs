// The web console in a real browser. The core (started by tests/console.rs) holds four
// simulated servers, a node agent's server `node-gone` that is down (its agent gone), the users ada (admin) and vera (viewer), and the environment `shop`
// (two tomcats and the balancer the second one asked for), every command finished.
import { test, expect } from "@playwright/test";

const ada = { username: "ada", password: process.env.ADA_PASSWORD };
const vera = { username: "vera", password: process.env.VERA_PASSWORD };

/** A page signed in as `who` (the browser answers the core's Digest challenge). */
async function signedIn(browser, who) {
  const context = await browser.newContext({ httpCredentials: who });
  const page = await context.newPage();
  page.on("dialog", (d) => d.accept());
  await page.goto("/");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.locator("#who")).toHaveText(`${who.username} (${who === ada ? "admin" : "viewer"})`);
  return page;
}

/** Waits until the view shows data (not the loading state). */
async function loaded(page) {
  await expect(page.locator("body[data-loaded]")).toBeAttached();
  await expect(page.locator("#live")).toHaveClass("live");
}

// What changes from run to run (times, event ids, the platform's name in guest ids) is masked.
const mask = (page) => [page.locator(".time"), page.locator("#live"), page.locator(".guest")];

test("an anonymous visitor sees the fleet, is told to sign in for the rest, and signs in", async ({ browser }) => {
  const page = await (await browser.newContext()).newPage();
  await page.goto("/");
  await expect(page.locator("#who")).toHaveText("anonymous");
  await expect(page.locator("tr[data-server]")).toHaveCount(5);
  await page.getByRole("link", { name: "Commands" }).click();
  await expect(page.locator("#data")).toContainText("authentication required");
  await expect(page.locator("#data")).toContainText("Sign in");
  await page.context().close();

  const signed = await signedIn(browser, ada);
  await signed.getByRole("link", { name: "Commands" }).click();
  await expect(signed.locator("tr[data-command]").first()).toBeVisible();
  await expect(signed.getByRole("button", { name: "Sign in" })).toBeHidden();
});

test("screenshots of the main pages", async ({ browser }) => {
  const page = await signedIn(browser, ada);
  await loaded(page);
  // Fleet: every server with its load bars.
  await expect(page.locator("tr[data-server]")).toHaveCount(5);
  await expect(page.locator('[role="meter"]')).toHaveCount(15);
  await expect(page).toHaveScreenshot("fleet.png", { mask: mask(page) });

  await page.getByRole("link", { name: "Environments" }).click();
  await expect(page.locator('tr[data-environment="shop"]')).toContainText("3");
  await expect(page).toHaveScreenshot("environments.png", { mask: mask(page) });

  // An environment's members in priority order: the balancer before the tomcats.
  await page.getByRole("link", { name: "shop" }).click();
  const members = page.locator("tr[data-container]");
  await expect(members).toHaveCount(3);
  await expect(members.nth(0)).toContainText("balancer");
  await expect(members.nth(1)).toContainText("tomcat");
  await expect(page).toHaveScreenshot("environment.png", { mask: mask(page) });

  // A container: its plugin state (the balancer's upstreams) and the scripts run inside.
  await members.nth(0).getByRole("link").click();
  await expect(page.locator("#plugin-state")).toContainText("upstreams");
  await expect(page.locator("h1")).toHaveText(/Container #\d+/);
  await expect(page).toHaveScreenshot("container.png", { mask: mask(page) });

  // The queue with parents and children.
  await page.getByRole("link", { name: "Commands" }).click();
  await expect(page.locator("tr[data-command]").first()).toBeVisible();
  await expect(page).toHaveScreenshot("commands.png", { mask: mask(page) });
  const add = page.locator("tr[data-command]").filter({ hasText: "environment.add" }).last();
  await add.getByRole("link").first().click();
  await expect(page.locator("h2", { hasText: "Children" })).toBeVisible();
  await expect(page.locator("#data tr[data-command]").first()).toBeVisible();
});

test("an operator's daily actions, and the page follows them live", async ({ browser }) => {
  const page = await signedIn(browser, ada);

  // Create an environment: its row appears without reloading.
  await page.getByRole("link", { name: "Environments" }).click();
  await page.getByPlaceholder("name (a-z, 0-9, -)").fill("blog");
  await page.getByRole("button", { name: "Create environment" }).click();
  await expect(page.locator("#notice")).toContainText("submitted");
  await expect(page.locator('tr[data-environment="blog"] .status')).toHaveText("active");

  // Open it (retried: on a loaded machine a live update may re-render the list under the
  // pointer), add a container: it shows up, then runs.
  await expect(async () => {
    const row = page.locator('tr[data-environment="blog"]');
    if ((await row.count()) === 0) {
      await page.getByRole("link", { name: "Environments" }).click();
    }
    await row.getByRole("link", { name: "blog", exact: true }).click({ timeout: 5000 });
    await expect(page.getByLabel("Container type")).toBeVisible({ timeout: 10000 });
  }).toPass({ timeout: 60000 });
  await page.getByLabel("Container type").selectOption("tomcat");
  await page.getByRole("button", { name: "Add container" }).click();
  const member = page.locator("tr[data-container]");
  await expect(member).toHaveCount(1);
  await expect(member.locator(".status")).toHaveText("running");

  // Stop and start it.
  await member.getByRole("button", { name: "Stop" }).click();
  await expect(member.locator(".status")).toHaveText("stopped");
  await member.getByRole("button", { name: "Start" }).click();
  await expect(member.locator(".status")).toHaveText("running");

  // Migrate it to a named server: its page shows the new server when the move is done.
  const from = (await member.locator("td").nth(4).textContent()).trim();
  await member.getByRole("link").click();
  const to = ["sim-1", "sim-2", "sim-3", "sim-4"].find((s) => s !== from);
  await page.getByLabel("Target server").selectOption(to);
  await page.getByRole("button", { name: "Migrate" }).click();
  await expect(page.locator("dl.facts")).toContainText(`Server${to}`);
  await expect(page.locator("#data tr[data-command]").filter({ hasText: "container.migrate" })
    .locator(".status")).toHaveText("succeeded");

  // Drain a server and undrain it.
  await page.getByRole("link", { name: "Fleet" }).click();
  const server = page.locator(`tr[data-server="${to}"]`);
  await server.getByRole("button", { name: "Drain" }).click();
  await expect(server).toContainText("draining");
  await expect(server.locator("td").nth(6)).toHaveText("0");
  await server.getByRole("button", { name: "Undrain" }).click();
  await expect(server).not.toContainText("draining");

  // Remove the member.
  await page.goto("/#/environments/blog");
  await page.locator("tr[data-container]").getByRole("button", { name: "Remove" }).click();
  await expect(page.locator("tr[data-container]")).toHaveCount(0);
});

test("a viewer is told what role an action needs", async ({ browser }) => {
  const page = await signedIn(browser, vera);
  await page.goto("/#/environments/shop");
  await page.locator("tr[data-container]").getByRole("button", { name: "Stop" }).first().click();
  await expect(page.locator("#notice")).toContainText("this needs role operator");
  await expect(page.locator("tr[data-container] .status").first()).toHaveText("running");

  await page.getByRole("link", { name: "Fleet" }).click();
  await page.locator('tr[data-server="node-gone"]').getByRole("button", { name: "Remove" }).click();
  await expect(page.locator("#notice")).toContainText("this needs role admin");
  await expect(page.locator('tr[data-server="node-gone"]')).toHaveCount(1);
});

test("a server whose agent is gone is removed for good", async ({ browser }) => {
  const page = await signedIn(browser, ada);
  const gone = page.locator('tr[data-server="node-gone"]');
  await expect(gone.locator(".status")).toHaveText("down");
  // Only there: a simulated server, or one whose agent beats, offers no removal.
  await expect(page.getByRole("button", { name: "Remove" })).toHaveCount(1);
  await gone.getByRole("button", { name: "Remove" }).click();
  await expect(page.locator("#notice")).toContainText("remove node-gone: done");
  await expect(gone).toHaveCount(0);
  await expect(page.locator("tr[data-server]")).toHaveCount(4);
});
