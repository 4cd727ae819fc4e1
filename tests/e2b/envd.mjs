// The unmodified E2B JS SDK against sandgate-envd in debug mode (E2B_DEBUG, E2B_SANDBOX_URL):
// commands, files, PTY and watch. Run by tests/tests/envd.rs; every check is an assert.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { Sandbox, CommandExitError, FileNotFoundError } from 'e2b'

const log = (...a) => console.log('[envd js]', ...a)
const sbx = await Sandbox.create()
const workdir = (await sbx.commands.run('mktemp -d')).stdout.trim()

// Commands.
let r = await sbx.commands.run('echo hello; echo $GREETING; pwd', { envs: { GREETING: 'hi' }, cwd: workdir })
assert.equal(r.stdout, `hello\nhi\n${workdir}\n`)
await assert.rejects(sbx.commands.run('echo oops >&2; exit 3'), (e) => {
  assert.ok(e instanceof CommandExitError, String(e))
  assert.equal(e.exitCode, 3)
  assert.equal(e.stderr, 'oops\n')
  assert.equal(e.message, 'exit status 3')
  return true
})
const lines = []
const t0 = Date.now()
r = await sbx.commands.run('for i in 1 2 3; do echo l$i; sleep 1; done', {
  onStdout: (l) => lines.push([Date.now() - t0, l]),
})
assert.equal(lines.length, 3, JSON.stringify(lines))
assert.ok(lines[0][0] < lines[2][0] - 1000, JSON.stringify(lines))
const bg = await sbx.commands.run('sleep 60', { background: true, timeoutMs: 0 })
assert.ok((await sbx.commands.list()).some((p) => p.pid === bg.pid && p.args.includes('sleep 60')))
assert.equal(await sbx.commands.kill(bg.pid), true)
await assert.rejects(bg.wait(), CommandExitError)
assert.equal(await sbx.commands.kill(bg.pid), false)
log('run, stream, background, list, kill')

// Files.
const d = `${workdir}/files`
assert.equal(await sbx.files.makeDir(d), true)
assert.equal(await sbx.files.makeDir(d), false)
await sbx.files.write(`${d}/a.txt`, 'some text')
assert.equal(await sbx.files.read(`${d}/a.txt`), 'some text')
assert.equal(await sbx.files.exists(`${d}/nope`), false)
await assert.rejects(sbx.files.read(`${d}/nope`), FileNotFoundError)
const blob = randomBytes(8 << 20)
await sbx.files.write(`${d}/big.bin`, blob)
const back = await sbx.files.read(`${d}/big.bin`, { format: 'bytes' })
assert.ok(Buffer.from(back).equals(blob), 'the binary file came back different')
await sbx.files.rename(`${d}/a.txt`, `${d}/b.txt`)
assert.deepEqual((await sbx.files.list(d)).map((e) => e.name).sort(), ['b.txt', 'big.bin'])
await sbx.files.remove(`${d}/b.txt`)
assert.equal(await sbx.files.exists(`${d}/b.txt`), false)
log('files')

// Watch.
const events = []
const w = await sbx.files.watchDir(workdir, (e) => events.push(e), { timeoutMs: 30_000 })
await sbx.files.write(`${workdir}/watched.txt`, 'w')
const until = Date.now() + 10_000
while (!events.some((e) => e.name === 'watched.txt') && Date.now() < until) {
  await new Promise((res) => setTimeout(res, 50))
}
await w.stop()
assert.ok(events.some((e) => e.name === 'watched.txt'), JSON.stringify(events))
log('watchDir')

// PTY.
let out = ''
const p = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => (out += new TextDecoder().decode(d)), cwd: workdir })
await sbx.pty.resize(p.pid, { cols: 120, rows: 40 })
await sbx.pty.sendInput(p.pid, new TextEncoder().encode('stty size; echo JS-$((40+2))\n'))
const ptyUntil = Date.now() + 10_000
while (!(out.includes('JS-42') && out.includes('40 120')) && Date.now() < ptyUntil) {
  await new Promise((res) => setTimeout(res, 50))
}
assert.ok(out.includes('JS-42') && out.includes('40 120'), out)
assert.equal(await sbx.pty.kill(p.pid), true)
log('pty; all passed')
