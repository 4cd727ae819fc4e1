"""Per-request cost of hot-route layouts in Envoy, static config, 10 000 hosts, 1 000 of them loaded.

Variants (comma list, first arg; rounds, second arg), each its own Envoy (--concurrency 1) behind
one direct_response upstream Envoy, wrk -t1 -c16 -d6s, rounds interleaved:
  direct  one route, destination from x-envoy-original-dst-host (Envoy alone)
  vhnc    a virtual host per hot host whose route sets the ORIGINAL_DST header (what ships)
  vh      the same with a composite filter (default: skip) in the chain
  cm      32 shard virtual hosts, a composite host -> set_metadata map (branch fastpath-shards)
  ch      the same with header_mutation instead of set_metadata
  fs      the same with set_filter_state (original_dst_address) instead
Run from the repo root: python3 docs/fastpath-spike/layouts_tput.py direct,vhnc,vh,cm,fs 4
"""
import json, subprocess, sys, time, urllib.request, socket, os, re
ENVOY=os.environ.get("ENVOY", ".tools/envoy/envoy/_bin/envoy")
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
N=10000; HOT=1000
def host(i): return f"{up}-sbx-{i}.sandbox.localhost"
def dest(i): return f"127.0.0.1:{up}" if i<HOT else f"10.{i//65536}.{(i//256)%256}.{i%256}:{up}"
def start(cfg, name):
    path=f"/tmp/sandgate-layouts-t-{name}.json"; json.dump(cfg,open(path,"w"))
    p=subprocess.Popen([ENVOY,"-c",path,"--concurrency","1","-l","error","--disable-hot-restart","--base-id",str(free_port())],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    return p
def hcm(vhosts, filters, lp):
    return [{"name":"l","address":{"socket_address":{"address":"127.0.0.1","port_value":lp}},"filter_chains":[{"filters":[{"name":"hcm","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager","stat_prefix":"x","route_config":{"name":"sandboxes","virtual_hosts":vhosts},"http_filters":filters+[{"name":"envoy.filters.http.router","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router","suppress_envoy_headers":True}}]}}]}]}]
def cluster(od): return [{"name":"fast","type":"ORIGINAL_DST","connect_timeout":"1s","lb_policy":"CLUSTER_PROVIDED","original_dst_lb_config":od,"circuit_breakers":{"thresholds":[{"max_connections":100000,"max_pending_requests":100000,"max_requests":100000}]}}]
SKIP={"action":{"name":"skip","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}
INPUT={"name":"host","typed_config":{"@type":"type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput","header_name":":authority"}}
COMP={"name":"comp","typed_config":{"@type":"type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher","extension_config":{"name":"composite","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"}},"xds_matcher":{"matcher_tree":{"input":INPUT,"exact_match_map":{"map":{"none.invalid":SKIP}}}}}}
RT={"runtime_fraction":{"default_value":{"numerator":100},"runtime_key":"k"}}
def variant(v, lp, admin):
    base={"admin":{"address":{"socket_address":{"address":"127.0.0.1","port_value":admin}}}}
    if v=="direct":
        vh=[{"name":"all","domains":["*"],"routes":[{"match":{"prefix":"/"},"route":{"cluster":"fast","timeout":"0s"}}]}]
        base["static_resources"]={"clusters":cluster({"use_http_header":True}),"listeners":hcm(vh,[],lp)}
    elif v in ("vh","vhnc"):
        vh=[{"name":f"v{i}","domains":[host(i)],"routes":[{"match":dict(prefix="/",**RT),"route":{"cluster":"fast","timeout":"0s"},"request_headers_to_add":[{"header":{"key":"x-sandgate-destination","value":dest(i)},"append_action":"OVERWRITE_IF_EXISTS_OR_ADD"}]}]} for i in range(N)]
        vh.append({"name":"d","domains":["*"],"routes":[{"match":{"prefix":"/"},"direct_response":{"status":404}}]})
        base["static_resources"]={"clusters":cluster({"use_http_header":True,"http_header_name":"x-sandgate-destination"}),"listeners":hcm(vh,[COMP] if v=="vh" else [],lp)}
    else:
        def act(i):
            if v=="fs": inner={"name":"m","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config","on_request_headers":[{"object_key":"envoy.network.transport_socket.original_dst_address","format_string":{"text_format_source":{"inline_string":dest(i)}}}]}}
            elif v=="cm": inner={"name":"m","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config","metadata":[{"metadata_namespace":"envoy.lb","value":{"x-sandbox-destination":dest(i)}}]}}
            else: inner={"name":"m","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation","mutations":{"request_mutations":[{"append":{"header":{"key":"x-sandgate-destination","value":dest(i)},"append_action":"OVERWRITE_IF_EXISTS_OR_ADD"}}]}}}
            return {"action":{"name":"r","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction","typed_config":inner}}}
        K=32; vh=[]
        for k in range(K):
            ids=[i for i in range(N) if i%K==k]
            vh.append({"name":f"hot-{k}","domains":[host(i) for i in ids],"routes":[{"match":dict(prefix="/",**RT),"route":{"cluster":"fast","timeout":"0s"}}],
               "typed_per_filter_config":{"comp":{"@type":"type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute","xds_matcher":{"matcher_tree":{"input":INPUT,"exact_match_map":{"map":{host(i):act(i) for i in ids}}}}}}})
        vh.append({"name":"d","domains":["*"],"routes":[{"match":{"prefix":"/"},"direct_response":{"status":404}}]})
        od={"metadata_key":{"key":"envoy.lb","path":[{"key":"x-sandbox-destination"}]}} if v=="cm" else {} if v=="fs" else {"use_http_header":True,"http_header_name":"x-sandgate-destination"}
        base["static_resources"]={"clusters":cluster(od),"listeners":hcm(vh,[COMP],lp)}
    return base
up=free_port()
upcfg={"static_resources":{"listeners":hcm([{"name":"u","domains":["*"],"routes":[{"match":{"prefix":"/"},"direct_response":{"status":200,"body":{"inline_string":"ok"}}}]}],[],up)}}
procs=[start(upcfg,"up")]
ports={}
variants=sys.argv[1].split(",")
for v in variants:
    lp,admin=free_port(),free_port(); ports[v]=lp; procs.append(start(variant(v,lp,admin),v))
time.sleep(8)
lua="/tmp/sandgate-layouts-w.lua"
open(lua,"w").write(f'local i = 0\nrequest = function()\n  i = (i + 7919) % {HOT}\n  return wrk.format("GET", "/", {{["Host"] = "{up}-sbx-" .. i .. ".sandbox.localhost", ["x-envoy-original-dst-host"] = "127.0.0.1:{up}"}})\nend\n')
res={v:[] for v in variants}
try:
  for r in range(int(sys.argv[2]) if len(sys.argv)>2 else 3):
    for v in variants:
        out=subprocess.run(["wrk","-t1","-c16","-d6s","-s",lua,f"http://127.0.0.1:{ports[v]}/"],capture_output=True,text=True).stdout
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)",out).group(1)); non2=re.search(r"Non-2xx or 3xx responses: (\d+)",out)
        res[v].append(rps); print(v, rps, "non2xx", non2.group(1) if non2 else 0, flush=True)
finally:
  for p in procs: p.kill()
import statistics
d=statistics.median(res["direct"]) if "direct" in res else 1
for v in variants: print(v, f"median {statistics.median(res[v]):.0f}", f"vs direct {statistics.median(res[v])/d:.3f}")
