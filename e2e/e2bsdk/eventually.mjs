// eventually retries fn every 250 ms until it resolves, for at most ms;
// then it fails naming what was awaited and fn's last error.
export async function eventually(what, fn, ms = 20_000) {
  const until = Date.now() + ms
  for (;;) {
    try {
      return await fn()
    } catch (e) {
      if (Date.now() > until) throw new Error(`${what}: ${e.message}`)
      await new Promise((r) => setTimeout(r, 250))
    }
  }
}
