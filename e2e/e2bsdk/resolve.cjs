// Stands in for wildcard DNS in the test: names under WILDCARD_DOMAIN
// (the control plane's ingress domain) resolve to 127.0.0.1, as an
// operator's `*.<domain>` record would send them to the ingress. Loaded
// with node --require; the e2b SDK itself is untouched.
const dns = require('node:dns')
const domain = (process.env.WILDCARD_DOMAIN || '').toLowerCase()
const lookup = dns.lookup
dns.lookup = function (host, options, callback) {
  if (typeof options === 'function') {
    callback = options
    options = {}
  }
  const name = String(host).toLowerCase()
  if (domain && (name === domain || name.endsWith('.' + domain))) {
    if (options && options.all) return process.nextTick(callback, null, [{ address: '127.0.0.1', family: 4 }])
    return process.nextTick(callback, null, '127.0.0.1', 4)
  }
  return lookup.call(this, host, options, callback)
}
