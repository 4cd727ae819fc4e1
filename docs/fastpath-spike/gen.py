import sys
n = int(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else 'metadata'
vh = []
for i in range(n):
    if mode == 'header':
        vh.append(f'''            - name: rc/sbx-{i}.local
              domains: ["sbx-{i}.local"]
              request_headers_to_add:
              - header: {{key: x-envoy-original-dst-host, value: "127.0.0.1:18090"}}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: dst}}}}]''')
        continue
    vh.append(f'''            - name: rc/sbx-{i}.local
              domains: ["sbx-{i}.local"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: dst}}}}]
              typed_per_filter_config:
                envoy.filters.http.header_to_metadata:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config
                  request_rules:
                  - header: x-sandgate-dst
                    remove: true
                    on_header_present: {{metadata_namespace: envoy.lb, key: x-sandbox-destination, value: "127.0.0.1:18090", type: STRING}}
                    on_header_missing: {{metadata_namespace: envoy.lb, key: x-sandbox-destination, value: "127.0.0.1:18090", type: STRING}}''')
hcm = lambda name, port, vhosts: f'''  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            name: rc
            virtual_hosts:
{vhosts}
          http_filters:
          - name: envoy.filters.http.header_to_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config
              request_rules:
              - header: x-sandgate-dst
                remove: true
                on_header_present: {{metadata_namespace: sandgate.stripped, key: dst, value: "1", type: STRING}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
'''
catchall = '''            - name: catchall
              domains: ["*"]
              routes: [{match: {prefix: "/"}, direct_response: {status: 502}}]'''
direct = '''            - name: direct
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: up}}]'''
print(f'''admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 19901}}}}
static_resources:
  listeners:
{hcm("fast", 10080, chr(10).join(vh + [catchall]))}
{hcm("direct", 10081, direct)}
  clusters:
  - name: dst
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    original_dst_lb_config:
      use_http_header: {'true' if mode == 'header' else 'false'}
      metadata_key: {{key: envoy.lb, path: [{{key: x-sandbox-destination}}]}}
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18090}}}}}}}}]}}]
''')
