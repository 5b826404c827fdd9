// The official e2b SDK, unchanged, against Wrenn: only its own settings
// point it here (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). Run by
// e2e/e2b_sdk_test.go, which passes CP_ADDR (the control plane's
// host:port, where getHost's names are sent as DNS would send them) and
// OTHER_API_KEY (a key of another team).
import { Sandbox, CommandExitError, SandboxNotFoundError, AuthenticationError, FileType, FilesystemEventType } from 'e2b'
import http from 'node:http'
import assert from 'node:assert/strict'
import { eventually } from './eventually.mjs'
import { createHash, randomBytes } from 'node:crypto'

const step = (m) => console.log(`[e2b] ${m}`)
const cpAddr = process.env.CP_ADDR
const [cpHost, cpPort] = cpAddr.split(':')

// get fetches a sandbox port's URL host as a resolver for the wildcard
// name would: connect to the control plane, name the host.
function get(host, path = '/', headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: cpHost, port: cpPort, path, headers: { Host: host, ...headers } }, (res) => {
      let body = ''
      res.on('data', (c) => (body += c))
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

let sbx
const made = []
try {
  // Create: metadata, environment, a timeout; "base" is the default template.
  sbx = await Sandbox.create({ metadata: { suite: 'e2b-sdk', run: process.pid.toString() }, envs: { GREETING: 'hello from e2b' }, timeoutMs: 120_000 })
  made.push(sbx)
  step(`created ${sbx.sandboxId}`)
  assert.ok(sbx.sandboxId.startsWith('sb-'))

  // Commands: output, exit codes, streaming callbacks.
  const r = await sbx.commands.run('echo "$GREETING"; echo oops >&2')
  assert.equal(r.stdout, 'hello from e2b\n')
  assert.equal(r.stderr, 'oops\n')
  assert.equal(r.exitCode, 0)
  await assert.rejects(sbx.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)
  const seen = []
  await sbx.commands.run('for i in 1 2 3; do echo line-$i; sleep 0.2; done', { onStdout: (d) => seen.push(d) })
  assert.equal(seen.join(''), 'line-1\nline-2\nline-3\n')
  await assert.rejects(sbx.commands.run('definitely-not-a-command'), (e) => e instanceof CommandExitError && e.exitCode === 127)
  step('commands: output, exit codes, streaming')

  // Background, stdin, kill.
  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'typed into stdin\n')
  await eventually('stdin echoed', async () => assert.match(cat.stdout, /typed into stdin/))
  const sleeper = await sbx.commands.run('sleep 600', { background: true })
  const listed = await sbx.commands.list()
  assert.ok(listed.some((p) => p.pid === sleeper.pid))
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
  await assert.rejects(sleeper.wait(), (e) => e instanceof CommandExitError)
  await sbx.commands.kill(cat.pid)
  step('background, stdin, kill')

  // Files: text, 10 MiB binary, list, exists, rename, remove, watch.
  await sbx.files.write('/home/user/notes/hello.txt', 'text through the SDK\n')
  assert.equal(await sbx.files.read('/home/user/notes/hello.txt'), 'text through the SDK\n')
  const blob = randomBytes(10 << 20)
  await sbx.files.write('/home/user/blob.bin', blob)
  const back = Buffer.from(await sbx.files.read('/home/user/blob.bin', { format: 'bytes' }))
  assert.equal(createHash('sha256').update(back).digest('hex'), createHash('sha256').update(blob).digest('hex'))
  const entries = await sbx.files.list('/home/user/notes')
  assert.deepEqual(entries.map((e) => [e.name, e.type]), [['hello.txt', FileType.FILE]])
  assert.equal(await sbx.files.exists('/home/user/notes/hello.txt'), true)
  assert.equal(await sbx.files.exists('/home/user/nope'), false)
  await sbx.files.rename('/home/user/notes/hello.txt', '/home/user/notes/renamed.txt')
  assert.equal(await sbx.files.exists('/home/user/notes/renamed.txt'), true)
  await sbx.files.remove('/home/user/notes/renamed.txt')
  assert.equal(await sbx.files.exists('/home/user/notes/renamed.txt'), false)
  const events = []
  const watcher = await sbx.files.watchDir('/home/user/notes', (ev) => events.push(ev))
  await sbx.files.write('/home/user/notes/watched.txt', 'x')
  // As E2B's own tests wait for it: a write event for the file's name,
  // and nothing about the upload's part file.
  await eventually('a write event', async () => assert.ok(events.some((e) => e.name === 'watched.txt' && e.type === FilesystemEventType.WRITE), JSON.stringify(events)))
  assert.deepEqual(events.filter((e) => e.name !== 'watched.txt'), [])
  await watcher.stop()
  // A signed download URL works without any header. (With E2B_SANDBOX_URL
  // the SDK puts that URL in it, which names no sandbox; a browser would
  // use the sandbox's own name, 49983-<id>.<domain>, as here.)
  const url = new URL(await sbx.downloadUrl('/home/user/notes/watched.txt', { useSignatureExpiration: 60 }))
  assert.ok(url.searchParams.get('signature').startsWith('v1_'))
  const dl = await get(sbx.getHost(49983), url.pathname + url.search)
  assert.equal(dl.status, 200, dl.body)
  assert.equal(dl.body, 'x')
  const unsigned = await get(sbx.getHost(49983), '/files?path=' + encodeURIComponent('/home/user/notes/watched.txt'))
  assert.equal(unsigned.status, 401)
  step('files: text, 10 MiB, list, exists, rename, remove, watch, signed URL')

  // PTY.
  let screen = ''
  const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => (screen += new TextDecoder().decode(d)) })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo pty-$((6*7))\n'))
  await eventually('the terminal answered', async () => assert.match(screen, /pty-42/))
  await sbx.pty.kill(term.pid)
  step('pty')

  // getHost reaches a server in the sandbox (public by default).
  await sbx.files.write('/tmp/hello.sh', "#!/bin/sh\nsed '/^\r$/q' >/dev/null\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 9\\r\\n\\r\\nhello-e2b'\n")
  await sbx.commands.run('chmod +x /tmp/hello.sh && socat TCP-LISTEN:8080,reuseaddr,fork EXEC:/tmp/hello.sh', { background: true })
  const host = sbx.getHost(8080)
  assert.match(host, new RegExp(`^8080-${sbx.sandboxId}\\.`))
  await eventually('the server answered through getHost', async () => {
    const res = await get(host)
    assert.equal(res.status, 200)
    assert.equal(res.body, 'hello-e2b')
  })
  step(`getHost(8080) = ${host}`)

  // A sandbox made with allowPublicTraffic false wants its traffic token.
  const closed = await Sandbox.create({ network: { allowPublicTraffic: false }, timeoutMs: 60_000 })
  made.push(closed)
  assert.ok(closed.trafficAccessToken)
  await closed.files.write('/tmp/hello.sh', "#!/bin/sh\nsed '/^\r$/q' >/dev/null\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok'\n")
  await closed.commands.run('chmod +x /tmp/hello.sh && socat TCP-LISTEN:8080,reuseaddr,fork EXEC:/tmp/hello.sh', { background: true })
  await eventually('the private server', async () => {
    assert.equal((await get(closed.getHost(8080), '/', { 'e2b-traffic-access-token': closed.trafficAccessToken })).status, 200)
  })
  assert.equal((await get(closed.getHost(8080))).status, 401)
  step('allowPublicTraffic: false wants the traffic token')

  // List, getInfo, setTimeout.
  const page = Sandbox.list({ query: { metadata: { suite: 'e2b-sdk' }, state: ['running'] } })
  const items = await page.nextItems()
  assert.deepEqual(items.map((s) => s.sandboxId), [sbx.sandboxId])
  assert.equal(items[0].metadata.run, process.pid.toString())
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.state, 'running')
  const before = info.endAt.getTime()
  await sbx.setTimeout(600_000)
  const later = (await sbx.getInfo()).endAt.getTime()
  assert.ok(later > before + 300_000, `setTimeout moved endAt from ${info.endAt.toISOString()} to ${new Date(later).toISOString()}`)
  step('list, getInfo, setTimeout')

  // Snapshots: a named snapshot makes sandboxes with its files; it is
  // listed, by name and by source, and deleted once.
  await sbx.files.write('/home/user/snap.txt', 'in the snapshot')
  const snap = await sbx.createSnapshot({ name: 'journey-snap' })
  assert.ok(snap.names.some((n) => n.includes('journey-snap')), JSON.stringify(snap))
  const fromSnap = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
  made.push(fromSnap)
  assert.equal(await fromSnap.files.read('/home/user/snap.txt'), 'in the snapshot')
  await fromSnap.kill()
  assert.ok((await Sandbox.listSnapshots({ name: 'journey-snap' }).nextItems()).some((x) => x.snapshotId === snap.snapshotId))
  assert.ok((await sbx.listSnapshots().nextItems()).some((x) => x.snapshotId === snap.snapshotId))
  // A template that is not a snapshot is never replaced by one.
  await assert.rejects(sbx.createSnapshot({ name: 'base' }), (e) => /not a snapshot/.test(e.message))
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
  // Fork: a running copy with the same files; the original runs on.
  const [fork] = await sbx.fork()
  assert.ok(fork instanceof Sandbox, String(fork))
  made.push(fork)
  assert.notEqual(fork.sandboxId, sbx.sandboxId)
  assert.equal(await fork.files.read('/home/user/snap.txt'), 'in the snapshot')
  assert.equal(await sbx.isRunning(), true)
  await fork.kill()
  step('snapshots: create, create from, list, delete; fork')

  // Pause, then connect resumes it with its memory.
  await sbx.commands.run('echo kept-in-memory > /dev/shm/mark')
  // A filesystem-only pause is refused, not ignored.
  await assert.rejects(sbx.pause({ keepMemory: false }), (e) => /not supported/.test(e.message))
  assert.equal(await sbx.pause(), true)
  assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
  // As from E2B's edge: a paused sandbox answers 502, which isRunning reads as false.
  assert.equal(await sbx.isRunning(), false)
  const again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
  assert.equal((await again.commands.run('cat /dev/shm/mark')).stdout, 'kept-in-memory\n')
  assert.equal((await again.getInfo()).state, 'running')
  assert.equal(await again.isRunning(), true)
  step('pause, connect')

  // Another team's key finds nothing; a bad key is refused.
  await assert.rejects(Sandbox.connect(sbx.sandboxId, { apiKey: process.env.OTHER_API_KEY }), (e) => e instanceof SandboxNotFoundError)
  assert.equal(await Sandbox.kill(sbx.sandboxId, { apiKey: process.env.OTHER_API_KEY }), false)
  await assert.rejects(Sandbox.create({ apiKey: 'e2b_' + '0'.repeat(40) }), (e) => e instanceof AuthenticationError)
  step("another team's key: not found; a bad key: refused")

  // Kill.
  assert.equal(await again.kill(), true)
  assert.equal(await again.isRunning(), false)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), (e) => e instanceof SandboxNotFoundError)
  made.length = 0
  await closed.kill()
  step('killed')
} catch (e) {
  console.error(`[e2b] FAILED: ${e.stack || e}`)
  process.exitCode = 1
} finally {
  for (const s of made) await s.kill().catch(() => {})
}
