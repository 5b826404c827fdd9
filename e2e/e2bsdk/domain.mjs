// The official e2b SDK given only E2B_DOMAIN (and E2B_API_KEY), as a user
// of a Wrenn install with the TLS ingress sets it: the API at
// https://api.<domain>, envd and every port at https://<port>-<id>.<domain>.
// Run by e2e/e2b_sdk_test.go with the test CA in NODE_EXTRA_CA_CERTS and
// resolve.cjs standing in for the wildcard DNS record.
import { Sandbox, SandboxNotFoundError } from 'e2b'
import assert from 'node:assert/strict'
import { eventually } from './eventually.mjs'

const step = (m) => console.log(`[e2b domain] ${m}`)
const domain = process.env.E2B_DOMAIN

let sbx
try {
  sbx = await Sandbox.create({ metadata: { suite: 'e2b-domain' }, timeoutMs: 120_000 })
  step(`created ${sbx.sandboxId} under ${sbx.sandboxDomain}`)
  assert.equal(sbx.sandboxDomain, domain)

  // envd over the TLS ingress: commands and files.
  const r = await sbx.commands.run('echo "$WRENN_SANDBOX_ID"')
  assert.equal(r.stdout, `${sbx.sandboxId}\n`)
  await sbx.files.write('/home/user/over-tls.txt', 'through https://49983-<id>.<domain>\n')
  assert.equal(await sbx.files.read('/home/user/over-tls.txt'), 'through https://49983-<id>.<domain>\n')
  step('commands and files through envd at its https name')

  // A signed download URL names the sandbox's own host: it works as is.
  const url = await sbx.downloadUrl('/home/user/over-tls.txt', { useSignatureExpiration: 60 })
  assert.ok(url.startsWith(`https://49983-${sbx.sandboxId}.${domain}/`), url)
  const dl = await fetch(url)
  assert.equal(dl.status, 200)
  assert.equal(await dl.text(), 'through https://49983-<id>.<domain>\n')
  step('signed download URL')

  // A server in the sandbox at https://<getHost(port)>.
  await sbx.files.write('/tmp/hello.sh', "#!/bin/sh\nsed '/^\r$/q' >/dev/null\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 9\\r\\n\\r\\nhello-tls'\n")
  await sbx.commands.run('chmod +x /tmp/hello.sh && socat TCP-LISTEN:8080,reuseaddr,fork EXEC:/tmp/hello.sh', { background: true })
  const host = sbx.getHost(8080)
  assert.equal(host, `8080-${sbx.sandboxId}.${domain}`)
  await eventually('the server answered at its https name', async () => {
    const res = await fetch(`https://${host}/`)
    assert.equal(res.status, 200)
    assert.equal(await res.text(), 'hello-tls')
  })
  step(`https://${host}`)

  // The API at api.<domain>: list, pause, connect, kill.
  const items = await Sandbox.list({ query: { metadata: { suite: 'e2b-domain' } } }).nextItems()
  assert.deepEqual(items.map((s) => s.sandboxId), [sbx.sandboxId])
  await sbx.commands.run('echo kept > /dev/shm/mark')
  assert.equal(await sbx.pause(), true)
  const again = await Sandbox.connect(sbx.sandboxId)
  assert.equal((await again.commands.run('cat /dev/shm/mark')).stdout, 'kept\n')
  assert.equal(await again.kill(), true)
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), (e) => e instanceof SandboxNotFoundError)
  sbx = undefined
  step('list, pause, connect, kill through api.<domain>')
} catch (e) {
  console.error(`[e2b domain] FAILED: ${e.stack || e}`)
  process.exitCode = 1
} finally {
  if (sbx) await sbx.kill().catch(() => {})
}
