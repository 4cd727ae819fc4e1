// The unmodified E2B JS SDK against sandgate-api: create, list with a metadata filter, kill.
// Run by tests/tests/e2b.rs with the environment tests/e2b/scenario.py documents.
import assert from 'node:assert/strict'
import http from 'node:http'
import { Sandbox } from 'e2b'

// One GET through the gateway with the sandbox host as Host (as wildcard DNS would route it).
const [gwHost, gwPort] = process.env.SANDGATE_GATEWAY.split(':')
const get = (host) =>
  new Promise((resolve, reject) => {
    http
      .get({ host: gwHost, port: Number(gwPort), path: '/', headers: { Host: host } }, (r) => {
        let body = ''
        r.on('data', (c) => (body += c))
        r.on('end', () => resolve({ status: r.statusCode, body }))
      })
      .on('error', reject)
  })

const run = Math.random().toString(16).slice(2, 10)
const sbx = await Sandbox.create('base', { timeoutMs: 120_000, metadata: { suite: run } })
assert.match(sbx.sandboxId, /^sbx-/)
assert.equal(sbx.getHost(8080), `8080-${sbx.sandboxId}.${process.env.E2B_DOMAIN}`)
const res = await get(sbx.getHost(8080))
assert.equal(res.status, 200, res.body)

const paginator = Sandbox.list({ query: { metadata: { suite: run } }, limit: 10 })
const listed = await paginator.nextItems()
assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])
assert.equal(listed[0].metadata.suite, run)
assert.equal(listed[0].state, 'running')

const info = await sbx.getInfo()
assert.equal(info.sandboxId, sbx.sandboxId)
assert.equal(await sbx.kill(), true)
assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'a second kill returns false')
const after = await Sandbox.list({ query: { metadata: { suite: run } } }).nextItems()
assert.deepEqual(after, [])
const gone = await get(sbx.getHost(8080))
assert.equal(gone.status, 502)
assert.match(JSON.parse(gone.body).message, /was not found/)
console.log(`[e2b js] create, list, kill ok (${sbx.sandboxId})`)
