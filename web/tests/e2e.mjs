// The dashboard in headless Chromium against a running stack: log in,
// create a capsule, run `echo hi` in its terminal, upload a file and see it
// listed, open a port of it through the ingress, move from one capsule's
// page to another's and act on the second, tag a host, create a team and switch to it and back, destroy the
// capsule. Screenshots of the main pages go to
// $SCREENSHOTS. Run by e2e/dashboard_test.go.
import { chromium } from 'playwright-core'
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

const base = process.env.WRENN_URL
const shots = process.env.SCREENSHOTS
mkdirSync(shots, { recursive: true })
const step = (m) => console.log(`[dashboard] ${m}`)

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic'],
})
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } })
page.setDefaultTimeout(60_000)
const problems = []
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`))
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`) })
page.on('dialog', (d) => d.accept())
// Sandbox ports are reached at <port>-<id>.localhost:<the control plane's port>.
const ingress = new RegExp(`^http://\\d+-sb-[a-z0-9]+\\.localhost:${new URL(base).port}/`)
const ours = (u) => u.startsWith(base) || ingress.test(u) || u.startsWith('ws') || u.startsWith('blob:') || u.startsWith('data:')
page.on('request', (r) => { if (!ours(r.url())) problems.push(`outside request: ${r.url()}`) })
const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`), fullPage: true })

try {
  await page.goto(base + '/')
  await page.getByRole('heading', { name: 'Log in' }).waitFor()
  await shot('login')
  await page.getByLabel('Email').fill(process.env.WRENN_EMAIL)
  await page.getByLabel('Password').fill(process.env.WRENN_PASSWORD)
  await page.getByRole('button', { name: 'Log in' }).click()
  await page.getByRole('heading', { name: 'Capsules' }).waitFor()
  step('logged in')

  await page.getByRole('button', { name: 'New capsule' }).click()
  await page.getByLabel('Memory (MB)').fill('256')
  await page.getByLabel('Metadata (key=value, comma separated)').fill('from=dashboard')
  await shot('create-dialog')
  await page.getByRole('button', { name: 'Create', exact: true }).click()
  await page.waitForURL(/#\/capsules\/sb-/)
  const id = page.url().split('/').pop()
  step(`created ${id}`)
  await page.getByTitle('running').waitFor({ timeout: 120_000 })
  await page.getByRole('status').filter({ hasText: 'connected' }).waitFor()
  await page.getByTestId('terminal').click()
  await page.keyboard.type('echo hi-from-$((6*7))')
  await page.keyboard.press('Enter')
  await page.locator('.xterm-rows').filter({ hasText: 'hi-from-42' }).waitFor()
  step('terminal answered')
  await shot('capsule-terminal')

  await page.getByRole('tab', { name: 'Files' }).click()
  const file = join(shots, 'upload.txt')
  writeFileSync(file, 'uploaded from the dashboard\n')
  await page.getByLabel('Upload a file').setInputFiles(file)
  await page.getByRole('cell', { name: 'upload.txt', exact: true }).waitFor()
  step('file uploaded and listed')
  await shot('capsule-files')

  // Ports: a server on the guest's 127.0.0.1 shows up with its URL, and
  // the link (carrying the traffic token) opens it through the ingress.
  // The server is a script uploaded here; it reads the request's head
  // before answering (closing on unread bytes would reset the connection).
  const script = join(shots, 'hello.sh')
  writeFileSync(script, "#!/bin/sh\nsed '/^\r$/q' >/dev/null\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 16\\r\\n\\r\\nhello-from-port\\n'\n")
  await page.getByLabel('Upload a file').setInputFiles(script)
  await page.getByRole('cell', { name: 'hello.sh', exact: true }).waitFor()
  await page.getByRole('tab', { name: 'Terminal' }).click()
  await page.getByTestId('terminal').click()
  await page.keyboard.type('chmod +x ~/hello.sh && (socat TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork EXEC:$HOME/hello.sh &)')
  await page.keyboard.press('Enter')
  await page.getByRole('tab', { name: 'Ports' }).click()
  const portLink = page.getByRole('table', { name: 'Ports' }).getByRole('link', { name: new RegExp(`^http://8080-${id}\\.`) })
  await portLink.waitFor()
  await shot('capsule-ports')
  const [popup] = await Promise.all([page.context().waitForEvent('page'), portLink.click()])
  await popup.getByText('hello-from-port').waitFor({ timeout: 15_000 }).catch(async (e) => {
    throw new Error(`the port's page at ${popup.url()} shows ${JSON.stringify((await popup.content()).slice(0, 500))}: ${e.message}`)
  })
  await popup.close()
  step('port listed and opened through the ingress')

  // The page follows its id: from A to B (no reload), B's header, and
  // B's Pause pauses B, not A; back to A, A still runs.
  await page.goto(base + '/#/capsules')
  await page.getByRole('button', { name: 'New capsule' }).click()
  await page.getByLabel('Memory (MB)').fill('256')
  await page.getByRole('button', { name: 'Create', exact: true }).click()
  await page.waitForURL((u) => /#\/capsules\/sb-/.test(u.href) && !u.href.endsWith(id))
  const idB = page.url().split('/').pop()
  await page.getByTitle('running').waitFor({ timeout: 120_000 })
  await page.goto(`${base}/#/capsules/${id}`)
  await page.getByRole('heading', { name: id }).waitFor()
  await page.evaluate((b) => { location.hash = `#/capsules/${b}` }, idB)
  await page.getByRole('heading', { name: idB }).waitFor()
  await page.getByRole('button', { name: 'Pause' }).click()
  await page.getByTitle('paused').waitFor({ timeout: 120_000 })
  await page.goBack()
  await page.getByRole('heading', { name: id }).waitFor()
  await page.getByTitle('running').waitFor()
  await page.getByRole('status').filter({ hasText: 'connected' }).waitFor()
  step(`navigated ${id} -> ${idB}, paused ${idB}; ${id} still runs`)
  await page.goto(`${base}/#/capsules/${idB}`)
  await page.getByRole('heading', { name: idB }).waitFor()
  await page.getByRole('button', { name: 'Destroy' }).click()
  await page.getByRole('heading', { name: 'Capsules' }).waitFor()

  await page.goto(base + '/#/capsules')
  await page.getByRole('link', { name: id }).waitFor()
  await shot('capsules')
  for (const p of ['templates', 'keys', 'team', 'usage', 'audit', 'hosts']) {
    await page.goto(`${base}/#/${p}`)
    await page.locator('main h1').waitFor()
    if (p === 'audit') await page.locator('tbody tr td.mono', { hasText: 'capsule.create' }).first().waitFor() // the log reads its page
    await page.waitForTimeout(300)
    await shot(p)
  }

  // Host tags: add one, see it, remove it.
  await page.goto(`${base}/#/hosts`)
  const hostCell = page.locator('td.mono').first()
  const hostID = (await hostCell.textContent()).trim()
  await page.getByLabel(`New tag for ${hostID}`).fill('gpu')
  await page.getByRole('button', { name: `Add tag to ${hostID}` }).click()
  await page.getByRole('button', { name: `Remove tag gpu from ${hostID}` }).waitFor()
  await shot('hosts-tagged')
  await page.getByRole('button', { name: `Remove tag gpu from ${hostID}` }).click()
  await page.getByRole('button', { name: `Remove tag gpu from ${hostID}` }).waitFor({ state: 'detached' })
  step(`tagged and untagged ${hostID}`)

  // Teams: make one, land in it (no capsules there), switch back.
  await page.goto(`${base}/#/team`)
  const heading = page.getByRole('heading', { name: /^Team: / }) // named once the teams have loaded
  await heading.waitFor()
  const firstTeam = (await heading.textContent()).replace('Team: ', '').trim()
  await page.getByLabel('New team name').fill('dashboard-team')
  await page.getByRole('button', { name: 'Create team' }).click()
  await page.getByRole('heading', { name: 'Team: dashboard-team' }).waitFor()
  await page.goto(`${base}/#/capsules`)
  await page.getByText('No capsules.').waitFor()
  await page.goto(`${base}/#/team`)
  await shot('team-switched')
  await page.getByRole('button', { name: `Switch to ${firstTeam}` }).click()
  await page.getByRole('heading', { name: `Team: ${firstTeam}` }).waitFor()
  await page.goto(`${base}/#/capsules`)
  await page.getByRole('link', { name: id }).waitFor()
  step('created a team, switched to it and back')

  await page.goto(`${base}/#/capsules/${id}`)
  await page.getByRole('button', { name: 'Destroy' }).click()
  await page.getByRole('heading', { name: 'Capsules' }).waitFor()
  await page.getByText('No capsules.').waitFor()
  step('destroyed')

  // The account page: the user's sign-in methods, and deletion guarded by their email.
  await page.getByRole('link', { name: 'Account' }).click()
  await page.getByRole('heading', { name: 'Delete your account' }).waitFor()
  if (!(await page.getByRole('button', { name: 'Delete account' }).isDisabled())) throw new Error('account deletion is not guarded by the email')
  await shot('account')
  step('account page')

  // The API's reference: Swagger UI renders the control plane's OpenAPI document.
  await page.goto(`${base}/docs`)
  await page.locator('.swagger-ui .info .title').filter({ hasText: 'Wrenn control plane API' }).waitFor()
  await page.locator('.opblock-tag').filter({ hasText: 'capsules' }).first().waitFor()
  await shot('api-docs')
  step('API reference at /docs')
} catch (e) {
  await shot('failure').catch(() => {})
  console.error(`[dashboard] ${e.stack || e}`)
  process.exitCode = 1
} finally {
  await browser.close()
}
if (problems.length) {
  console.error('[dashboard] problems:\n' + problems.join('\n'))
  process.exitCode = 1
}
