// Playwright runs the console's browser tests in Debian's Chromium; `tests/console.rs` starts a
// core with known contents and runs `npx playwright test` with CONSOLE_URL pointing at it.
import { defineConfig } from "@playwright/test";

export default defineConfig({
  testDir: ".",
  testMatch: "*.spec.mjs",
  fullyParallel: false,
  workers: 1,
  retries: 0,
  timeout: 90_000,
  expect: {
    timeout: 20_000,
    toHaveScreenshot: { maxDiffPixels: 200, animations: "disabled", caret: "hide" },
  },
  reporter: [["list"]],
  outputDir: process.env.CONSOLE_OUT ?? "test-results",
  snapshotPathTemplate: "{testDir}/screenshots/{arg}{ext}",
  use: {
    baseURL: process.env.CONSOLE_URL,
    browserName: "chromium",
    viewport: { width: 1280, height: 900 },
    colorScheme: "light",
    locale: "en-GB",
    timezoneId: "UTC",
    launchOptions: { executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" },
  },
});
