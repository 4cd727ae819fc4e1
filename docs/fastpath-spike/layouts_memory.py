"""Envoy memory per hot host when routes arrive in steps (file-based RDS, not VHDS: no VHDS proto copies).

  python3 docs/fastpath-spike/layouts_memory.py vhost 10000 40    # a virtual host per host
  python3 docs/fastpath-spike/layouts_memory.py comp 10000 40     # 16 shards, composite map, 3 metadata fields
  python3 docs/fastpath-spike/layouts_memory.py comp 10000 40 one # the same with one field
Prints heap in use and RSS growth per host after the last step (memory release on, 3 s settle).
"""
import json, subprocess, sys, time, urllib.request, socket, os
ENVOY=os.environ.get("ENVOY", ".tools/envoy/envoy/_bin/envoy")
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def host(i): return f"49983-sbx-{i:06d}abcdefgh.sandbox.example.com"
def dest(i): return f"10.{i//65536}.{(i//256)%256}.{i%256}:49983"
RT={"runtime_fraction":{"default_value":{"numerator":0},"runtime_key":"sandgate.fast_path.valid"}}
def pervhost(n):
    return [{"name":f"sandboxes/{host(i)}","domains":[host(i)],"routes":[{"name":f"sbx-{i:06d}abcdefgh","match":dict(prefix="/",**RT),"route":{"cluster":"fast","timeout":"0s"},
      "request_headers_to_add":[{"header":{"key":"x-sandgate-destination","value":dest(i)},"append_action":"OVERWRITE_IF_EXISTS_OR_ADD"}]}]} for i in range(n)]
def sm(i):
    return {"@type":"type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config","metadata":[{"metadata_namespace":"envoy.lb","value":({"x-sandbox-destination":dest(i)} if ONE else {"x-sandbox-destination":dest(i),"sandbox-id":f"sbx-{i:06d}abcdefgh","port":"49983"})}]}
def shard(ids, k):
    mp={host(i):{"action":{"name":"a","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction","typed_config":{"name":"m","typed_config":sm(i)}}}} for i in ids}
    return {"name":f"sandboxes/hot-{k}","domains":[host(i) for i in ids],"routes":[{"match":dict(prefix="/",**RT),"route":{"cluster":"fast","timeout":"0s"}}],
      "typed_per_filter_config":{"composite":{"@type":"type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute","xds_matcher":{"matcher_tree":{"input":{"name":"host","typed_config":{"@type":"type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput","header_name":":authority"}},"exact_match_map":{"map":mp}}}}}}
def composite(n, K=16):
    out=[]
    for k in range(K):
        ids=[i for i in range(n) if i%K==k]
        if ids: out.append(shard(ids,k))
    return out
SKIP={"action":{"name":"skip","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}
comp={"name":"composite","typed_config":{"@type":"type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher","extension_config":{"name":"composite","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"}},"xds_matcher":{"matcher_tree":{"input":{"name":"host","typed_config":{"@type":"type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput","header_name":":authority"}},"exact_match_map":{"map":{"none.invalid":SKIP}}}}}}
def write(path, vhosts, ver):
    rc={"@type":"type.googleapis.com/envoy.config.route.v3.RouteConfiguration","name":"sandboxes","virtual_hosts":vhosts+[{"name":"default","domains":["*"],"routes":[{"match":{"prefix":"/"},"direct_response":{"status":404}}]}]}
    json.dump({"version_info":str(ver),"resources":[rc]},open(path+".tmp","w")); os.rename(path+".tmp",path)
def stat(admin,name):
    for l in urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter={name}").read().decode().splitlines():
        if l.startswith(name+":"): return int(l.split(":")[1])
    return 0
def main(design, N, steps):
    admin=free_port(); lp=free_port(); rds="/tmp/sandgate-layouts-rds.json"
    write(rds, [], 0)
    dst={"use_http_header":True,"http_header_name":"x-sandgate-destination"} if design=="vhost" else {"metadata_key":{"key":"envoy.lb","path":[{"key":"x-sandbox-destination"}]}}
    cfg={"node":{"id":"n","cluster":"c"},"admin":{"address":{"socket_address":{"address":"127.0.0.1","port_value":admin}}},
     "memory_allocator_manager":{"bytes_to_release":16777216,"memory_release_interval":"1s"},
     "static_resources":{"clusters":[{"name":"fast","type":"ORIGINAL_DST","connect_timeout":"1s","lb_policy":"CLUSTER_PROVIDED","original_dst_lb_config":dst}],
      "listeners":[{"name":"l","address":{"socket_address":{"address":"127.0.0.1","port_value":lp}},"filter_chains":[{"filters":[{"name":"hcm","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager","stat_prefix":"x","rds":{"route_config_name":"sandboxes","config_source":{"path_config_source":{"path":rds},"resource_api_version":"V3"}},"http_filters":([comp] if design!="vhost" else [])+[{"name":"envoy.filters.http.router","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]}}
    json.dump(cfg,open("/tmp/sandgate-layouts-dcfg.json","w"))
    p=subprocess.Popen([ENVOY,"-c","/tmp/sandgate-layouts-dcfg.json","--concurrency","1","-l","warning","--disable-hot-restart"],stdout=subprocess.DEVNULL,stderr=open("/tmp/sandgate-layouts-envoy.log","w"))
    def rss(): return [int(l.split()[1])*1024 for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0]
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready").read().strip()==b"LIVE": break
            except Exception: pass
            time.sleep(0.1)
        time.sleep(2); r0=rss(); a0=int(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory").read())["allocated"])
        t=time.time()
        for s in range(1,steps+1):
            n=N*s//steps
            before=stat(admin,"http.x.rds.sandboxes.update_success")
            write(rds, pervhost(n) if design=="vhost" else composite(n), s)
            while stat(admin,"http.x.rds.sandboxes.update_success")<=before:
                if p.poll() is not None: raise SystemExit(open("/tmp/sandgate-layouts-envoy.log").read()[-2000:])
                time.sleep(0.02)
        el=time.time()-t
        time.sleep(3)
        a1=int(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory").read())["allocated"]); r1=rss()
        print(f"design={design} N={N} steps={steps} heap/entry={(a1-a0)/N:.0f} rss/entry={(r1-r0)/N:.0f} fill={el:.1f}s rejected={stat(admin,'http.x.rds.sandboxes.update_rejected')}")
    finally:
        p.kill(); p.wait()
ONE=len(sys.argv)>4
main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
