local i = 0
request = function()
  i = (i + 1) % 1000
  return wrk.format("GET", "/", {["Host"] = "sbx-" .. i .. ".local"})
end
